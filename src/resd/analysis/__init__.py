"""Reading runs: evaluation (`resd eval`), side-by-side comparisons (`resd compare`),
continual-learning stages (`resd continual`) and the HTML report (`resd report`)."""
