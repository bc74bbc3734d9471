"""modeconn_fast: fast mode connectivity for any PyTorch nn.Module."""
__version__ = "0.1.0"
