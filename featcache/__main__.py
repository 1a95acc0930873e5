"""`python -m featcache` (also what torchrun runs)."""

from featcache.cli import main

if __name__ == "__main__":
    main()
