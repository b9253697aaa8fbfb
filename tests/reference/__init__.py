"""Reference procedures of model authors, for genret's parity tests (see each module's docstring for its source)."""
