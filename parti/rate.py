"""Serves the side-by-side rating app over two or more inference runs.

    python -m parti.rate --gin_file=gin/rating/rate.gin \
      --gin.RUNS="['runs/infer_a', 'runs/infer_b']" --gin.DATABASE=runs/ratings.sqlite

Each run is a `parti.infer` OUTPUT_DIR over the same prompts; the prompts every run
finished are rated (the rest are dropped, and counted). Raters open the printed address,
give a name and answer Parti's two questions (which image is more realistic; which
matches the text better) for each pair of images, in a random order and with the runs'
names hidden. Answers are committed to the SQLite DATABASE one item at a time, so a
killed server loses nothing and a rater resumes where they stopped. Results, with 95%
intervals and broken down by PartiPrompts Category and Challenge and by rater, are at
/results, /results.csv and /results.json. Needs the `rating` extra (Flask).

The server listens on 127.0.0.1 unless `host` says otherwise; port 0 takes a free port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import gin
from absl import logging

from parti.rating.items import load_runs
from parti.rating.store import RatingStore
from parti.runtime import gin_utils
from parti.runtime.errors import ConfigError


def rate(*, runs: Sequence[str], database: str, host: str = "127.0.0.1", port: int = 8080):
  """Loads the runs and serves the app until interrupted.

  Raises:
    ConfigError: bad runs (see `items.load_runs`), a database of a newer schema, a
      missing Flask, or a port in use.
  """
  try:
    from werkzeug.serving import make_server

    from parti.rating.app import create_app
  except ImportError as error:
    raise ConfigError(
      f"The rating app needs Flask ({error}): pip install 'parti-jax[rating]'."
    ) from error
  rating_set = load_runs(runs)
  store = RatingStore(database)
  if not _is_loopback(host):
    logging.warning("Serving on %s: anyone who can reach this address can rate.", host)
  try:
    server = make_server(host, port, create_app(rating_set, store), threaded=True)
  except OSError as error:
    raise ConfigError(f"Cannot listen on {host}:{port}: {error}") from error
  address = f"http://{host}:{server.port}/"
  print(
    f"Rating {len(rating_set.items)} items ({len(rating_set.run_names)} runs: "
    f"{', '.join(rating_set.run_names)}; {rating_set.dropped_prompts} prompts dropped) "
    f"at {address} ; answers in {store.path}",
    flush=True,
  )
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


configured_rate = gin.external_configurable(rate)

if __name__ == "__main__":
  gin_utils.run(configured_rate)
