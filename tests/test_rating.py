"""The side-by-side rating app: items from inference runs, the SQLite store, the results'
statistics, the app's refusals, and an end-to-end test in a real headless browser."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from parti.rating import items as items_lib
from parti.rating import results
from parti.rating.store import RatingStore
from parti.runtime.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [
  ("a red circle", "Abstract", "Basic"),
  ("two blue squares", "Abstract", "Quantity"),
  ("a green star above a white cross", "Arts", "Spatial"),
  ("three yellow stars", "Arts", "Quantity"),
]


def make_run(folder: pathlib.Path, color, prompts=PROMPTS, missing=()) -> pathlib.Path:
  """An inference output folder as parti.infer writes it: images and a manifest."""
  (folder / "images").mkdir(parents=True)
  lines = []
  for index, (prompt, category, challenge) in enumerate(prompts):
    name = f"images/{index:05d}_0.png"
    if prompt not in missing:
      Image.fromarray(np.full((48, 48, 3), color, np.uint8)).save(folder / name)
    lines.append({"index": index, "prompt": prompt, "request": prompt, "category": category,
                  "challenge": challenge, "files": [name]})  # fmt: skip
  (folder / "manifest-00000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return folder


@pytest.fixture
def runs(tmp_path):
  return [str(make_run(tmp_path / n, c)) for n, c in (("base", (200, 0, 0)), ("big", (0, 0, 200)))]


def test_items_pair_the_runs_over_their_shared_prompts(tmp_path, caplog):
  a = make_run(tmp_path / "a", 10)
  b = make_run(tmp_path / "b", 20, missing=("three yellow stars",))
  c = make_run(tmp_path / "c", 30, prompts=[*PROMPTS[:3], ("a black diamond", "", "")])
  rating_set = items_lib.load_runs([str(a), str(b), str(c)])
  assert rating_set.run_names == ("a", "b", "c")
  assert rating_set.dropped_prompts == 2  # Unfinished in b; not in c; c's own extra one.
  assert "dropped" in caplog.text
  assert len(rating_set.items) == 3 * 3  # Three pairs of runs, three shared prompts.
  item = rating_set.items[0]
  assert item.runs == ("a", "b") and item.category == "Abstract" and item.images[0].is_file()
  # Sides are random per rater and item, and the same on every visit.
  sides = {item.left_run(f"rater{i}") for i in range(20)}
  assert sides == {"a", "b"} and item.left_run("x") == item.left_run("x")
  assert rating_set.order_for("x") == rating_set.order_for("x") != rating_set.order_for("y")
  # Same-named folders are told apart by their parents.
  names = items_lib.load_runs([str(make_run(tmp_path / "p" / "run", 1)),
                               str(make_run(tmp_path / "q" / "run", 2))]).run_names  # fmt: skip
  assert names == ("p/run", "q/run")


def test_bad_runs_are_refused_clearly(tmp_path):
  with pytest.raises(ConfigError, match="two runs or more"):
    items_lib.load_runs([str(make_run(tmp_path / "only", 1))])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match=r"empty has no manifest-\*\.jsonl"):
    items_lib.load_runs([str(tmp_path / "only"), str(tmp_path / "empty")])
  other = make_run(tmp_path / "other", 2, prompts=[("a black diamond", "", "")])
  with pytest.raises(ConfigError, match="no finished prompt in common"):
    items_lib.load_runs([str(tmp_path / "only"), str(other)])


def test_wilson_intervals_and_agreement():
  low, high = results.wilson_interval(5, 10)
  assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
  assert results.wilson_interval(0, 20)[0] == 0.0 and results.wilson_interval(20, 20)[1] == 1.0
  rows = [
    {"rater": r, "item": i, "question": "match", "winner": w}
    for r, answers in (("ann", "AABA"), ("bob", "AABB"))
    for i, w in zip("wxyz", answers, strict=True)
  ]
  (pair,) = results.agreement(rows)
  assert pair["shared_answers"] == 4 and pair["agreement"] == 0.75
  # Observed 0.75; by chance 0.75 * 0.5 + 0.25 * 0.5 = 0.5; kappa = 0.25 / 0.5.
  assert pair["cohen_kappa"] == pytest.approx(0.5)


def test_the_store_commits_each_answer_and_refuses_a_newer_schema(tmp_path, runs):
  rating_set = items_lib.load_runs(runs)
  item = rating_set.items[0]
  store = RatingStore(tmp_path / "ratings.sqlite")
  store.answer("ann", item, item.runs[1], {"realism": "left", "match": "same"})
  rows = RatingStore(tmp_path / "ratings.sqlite").rows()  # A new connection sees them.
  assert [(r["question"], r["winner"]) for r in rows] == [("realism", item.runs[1]), ("match", "")]
  store.answer("ann", item, item.runs[1], {"realism": "right", "match": "same"})  # Replaced.
  assert len(store.rows()) == 2 and store.answered_items("ann") == {item.id}
  # Raters at once: threads writing together lose nothing.
  threads = [
    threading.Thread(target=lambda r=r: [
      store.answer(r, it, it.runs[0], {"realism": "left", "match": "left"})
      for it in rating_set.items
    ]) for r in ("t1", "t2", "t3")
  ]  # fmt: skip
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(store.rows()) == 2 + 3 * 2 * len(rating_set.items)
  connection = sqlite3.connect(tmp_path / "ratings.sqlite")
  connection.execute("PRAGMA user_version = 99")
  connection.commit()
  connection.close()
  with pytest.raises(ConfigError, match="newer version of the rating app"):
    RatingStore(tmp_path / "ratings.sqlite")


def test_the_app_refuses_bad_requests_without_a_trace(tmp_path, runs):
  from parti.rating.app import create_app

  rating_set = items_lib.load_runs(runs)
  client = create_app(rating_set, RatingStore(tmp_path / "r.sqlite")).test_client()
  page = client.get("/rate/ann").get_data(as_text=True)
  assert "ann: 0 of 4 done" in page
  assert "base" not in page and "big" not in page  # The runs' names are hidden.
  token = re.search(r'/image/(\w+)"', page)[1]
  assert client.get(f"/image/{token}").status_code == 200
  for path in ("/image/nope", "/image/..%2F..%2Fetc%2Fpasswd", "/images/00000_0.png",
               "/../manifest-00000.jsonl", "/static/x"):  # fmt: skip
    response = client.get(path)
    assert response.status_code == 404 and "Traceback" not in response.get_data(as_text=True)
  assert client.post("/start", data={"rater": "<script>"}).status_code == 400
  assert client.get("/rate/" + "x" * 41).status_code == 400
  item = re.search(r'name="item" value="(\w+)"', page)[1]
  bad = client.post("/answer", data={"rater": "ann", "item": item, "realism": "left"})
  assert bad.status_code == 400 and "Answer each of" in bad.get_data(as_text=True)
  assert client.post("/answer", data={"rater": "ann", "item": "zz", "realism": "left",
                                      "match": "left"}).status_code == 400  # fmt: skip
  good = client.post("/answer", data={"rater": "ann", "item": item, "realism": "left",
                                      "match": "same"})  # fmt: skip
  assert good.status_code == 303 and "ann: 1 of 4 done" in client.get("/rate/ann").get_data(
    as_text=True
  )
  # A file deleted after start-up is a clear 404, not a crash.
  for path in pathlib.Path(runs[0], "images").iterdir():
    path.unlink()
  page = client.get("/rate/bob").get_data(as_text=True)
  missing = [client.get(f"/image/{t}") for t in re.findall(r'/image/(\w+)"', page)]
  assert any(r.status_code == 404 and "missing" in r.get_data(as_text=True) for r in missing)


def _chromium():
  """The Debian chromium and chromedriver the project's setup installs (make test)."""
  browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (browser and driver):
    pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
  return browser, driver


class _Server:
  """`python -m parti.rate` in a subprocess, on a free port."""

  def __init__(self, runs, database):
    command = [
      sys.executable, "-m", "parti.rate", "--gin_file=gin/rating/rate.gin",
      f"--gin.RUNS={runs!r}", f"--gin.DATABASE='{database}'", "--gin.rate.port=0",
    ]  # fmt: skip
    self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = self.process.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
    assert match, line
    self.address = match[1]

  def kill(self):
    self.process.kill()
    self.process.wait()


@pytest.mark.slow
def test_raters_rate_in_a_real_browser_and_nothing_is_lost_across_a_restart(tmp_path, runs):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys

  browser, driver_path = _chromium()
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,1000"):
    options.add_argument(flag)
  database = tmp_path / "ratings.sqlite"
  server = _Server(runs, database)
  driver = webdriver.Chrome(service=Service(driver_path), options=options)
  shots = os.environ.get("PARTI_SCREENSHOTS")
  try:
    driver.get(server.address)
    driver.find_element(By.ID, "rater").send_keys("ann")
    driver.find_element(By.ID, "start").click()
    # Wait for the rating page: the start page's body goes stale as it is replaced.
    _wait_for(driver, "ann: 0 of 4 done")
    body = driver.find_element(By.TAG_NAME, "body")
    if shots:
      driver.save_screenshot(str(pathlib.Path(shots) / "rating_page.png"))
    # Item 1 by the digits, item 2 by the arrows: the second answer submits.
    body.send_keys("1")
    body.send_keys("3")
    _wait_for(driver, "ann: 1 of 4 done")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
    _wait_for(driver, "ann: 2 of 4 done")
    # Item 3 with the mouse.
    driver.find_element(By.ID, "realism-right").click()
    driver.find_element(By.ID, "match-right").click()
    driver.find_element(By.ID, "next").click()
    _wait_for(driver, "ann: 3 of 4 done")
    server.kill()  # Killed mid-study: the three answered items are already committed.
    server = _Server(runs, database)
    driver.get(server.address + "rate/ann")
    _wait_for(driver, "ann: 3 of 4 done")  # Resumed.
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)
    driver.find_element(By.TAG_NAME, "body").send_keys("2")
    _wait_for(driver, "ann: 4 of 4 done")
    driver.get(server.address + "results")
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "base vs big" in text and "Which image matches the text better?" in text
    if shots:
      driver.save_screenshot(str(pathlib.Path(shots) / "rating_results.png"))
  finally:
    driver.quit()
    server.kill()
  rows = (
    sqlite3.connect(database)
    .execute("SELECT item, question, choice, left_run, winner FROM answers ORDER BY id")
    .fetchall()
  )
  assert len(rows) == 8 and len({r[0] for r in rows}) == 4
  choices = [r[2] for r in rows]
  assert choices == ["left", "same", "right", "left", "right", "right", "same", "right"]
  for _, _, choice, left, winner in rows:
    assert winner == {"left": left, "same": ""}.get(choice, ({"base", "big"} - {left}).pop())
  server = _Server(runs, database)
  try:
    import urllib.request

    with urllib.request.urlopen(server.address + "results.json") as response:
      data = json.load(response)
    with urllib.request.urlopen(server.address + "results.csv") as response:
      csv_text = response.read().decode()
  finally:
    server.kill()
  realism = data["pairs"][0]["questions"]["realism"]["all"][""]
  base_wins = sum(r[4] == "base" for r in rows if r[1] == "realism")
  assert realism["answers"] == 4 and realism["win"]["count"] == base_wins
  assert csv_text.splitlines()[0].startswith("run_a,run_b,question,group_by")
  assert "category" in data["pairs"][0]["questions"]["match"]


def _wait_for(driver, text: str, seconds: float = 10.0) -> None:
  from selenium.webdriver.common.by import By

  deadline = time.time() + seconds
  while time.time() < deadline:
    try:
      if text in driver.find_element(By.TAG_NAME, "body").text:
        return
    except Exception:  # The page is being replaced.
      pass
    time.sleep(0.05)
  raise AssertionError(f"{text!r} not shown; the page says {driver.page_source[:500]!r}")
