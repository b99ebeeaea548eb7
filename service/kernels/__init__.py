"""Native CPU kernels the model runs through, compiled on first use with the machine's C compiler.

Only what PyTorch lacks lives here: :mod:`service.kernels.gguf_blocks` multiplies by weights kept in
llama.cpp's Q4_1 and Q8_0 blocks (5 and 8.5 bits a weight) that reproduce the served bf16 weights
bit for bit.
"""
