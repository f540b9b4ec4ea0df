"""The Triton backend (SPEC §19): a PyTorch module whose hot regions call generated Triton kernels."""
