"""Building and loading students and tokenizers (safetensors only), LoRA, model import, memory estimates."""
