"""The test suites; a regular package so that no installed top-level ``tests`` (iterative-stratification ships one) shadows ``tests.support``."""
