"""``python -m deltaml``: the ``deltaml`` console script (:mod:`deltaml.cli`)."""

from deltaml.cli import main

if __name__ == "__main__":  # pragma: no branch
    main(prog_name="deltaml")
