"""`python -m dpjax.train`: the program lives in `dpjax.cli.train`."""

from dpjax.cli.train import run

if __name__ == "__main__":
  run()
