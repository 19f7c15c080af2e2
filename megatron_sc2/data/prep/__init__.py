"""The offline side of data: reading corpora, StarCoder2's repository format, tokenizer
training, preprocessing into `.bin/.idx`, merging and inspecting datasets.

Nothing here imports torch: preprocessing starts fast.
"""
