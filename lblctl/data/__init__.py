"""Inputs: identity folders and CSVs, pairs CSVs, features files (one reader each)."""
