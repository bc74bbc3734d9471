"""The peers the project is measured against, one module per kind, each written as its users write it."""
