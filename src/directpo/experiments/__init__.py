"""The paper's experiments as runnable recipes (`directpo experiment <name>`)."""
