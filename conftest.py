"""Doctests run with their module's own globals only: every public example
imports what it uses, as a reader pasting it into a fresh interpreter would."""
