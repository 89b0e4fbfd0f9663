"""The Hugging Face side of HARPE: a Llama whose query groups rotate with their own RoPE bases.

These two files are copied next to an exported checkpoint and loaded with ``trust_remote_code=True``.
"""
