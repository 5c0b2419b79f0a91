"""directpo: Direct Preference Optimization (Rafailov et al., 2023) for any Hugging Face causal LM."""
__version__ = "0.1.0"
