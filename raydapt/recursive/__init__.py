"""Recursive LMs (Levine et al., 2022): a second pass of the same frozen LM, textual or neural."""
