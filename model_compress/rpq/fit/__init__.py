"""Data-aware RPQ fitting: calibration statistics, the column sweep, the codebook refit, bit allocation, fine-tuning.

Each layer is fitted against its output error on calibration inputs, tr((W - W_hat) H (W - W_hat)^T)
with H = sum of x x^T, not against ||W - W_hat||: weights that meet large inputs matter more.
"""
