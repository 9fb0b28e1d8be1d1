"""Tools over the library: the benchmark, the budget-to-model search and its hardware table, routing diagnostics."""
