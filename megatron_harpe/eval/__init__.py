"""Long-context evaluation of Hugging Face model directories (plain Llama or exported HARPE)."""
