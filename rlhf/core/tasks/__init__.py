"""Built-in tasks: problems, reference answers and the oracle teacher's rules."""
