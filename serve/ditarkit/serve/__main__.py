"""`python -m ditarkit.serve` is ditar-serve."""

from ditarkit.serve.cli import serve_main

if __name__ == "__main__":
    serve_main(prog_name="ditar-serve")
