"""The rating web app (Flask): a rater gives a name, then answers Parti's two questions
for one prompt and two images at a time, until every item is answered.

Routes:
  GET  /                      the name form
  POST /start                 -> /rate/<rater>
  GET  /rate/<rater>          the rater's next unanswered item, and their progress
  POST /answer                records both answers (one transaction), -> the next item
  GET  /image/<token>         an image, by an opaque token made at start-up
  GET  /results               win / tie / loss per question with 95% intervals
  GET  /results.csv, /results.json

Runs' names never reach the rating page (the images are served by token, and which run
is left is drawn per rater and item). No part of a request becomes a path: a token
either names one of the images loaded at start-up or is a 404. Bad input is a 400 or
404 with a one-line message; nothing else of the server is shown.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets

import flask
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

from parti.rating import results as results_lib
from parti.rating.items import RatingSet
from parti.rating.store import CHOICES, QUESTIONS, RatingStore

RATER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,39}")
QUESTION_TEXT = {
  "realism": "Which image is more realistic?",
  "match": "Which image matches the text better?",
}

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
 .pair { display: flex; gap: 2em; justify-content: center; }
 .pair figure { margin: 0; text-align: center; }
 .pair img { width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #ccc; }
 fieldset { margin: 1em 0; border: 2px solid #ddd; }
 fieldset.current { border-color: #2a6df4; }
 .prompt { font-size: 1.3em; text-align: center; margin: 1em; }
 .progress { color: #666; }
 table { border-collapse: collapse; margin: 1em 0; }
 td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
</style></head><body>{{ body }}</body></html>"""

_NAME_FORM = """<h1>Side-by-side rating</h1>
<p>You will see a prompt and two images, and answer which image is more realistic and which
matches the text better. Use the keys 1 (left), 2 (right), 3 (about the same), or the
arrows (left, right, down), or the mouse.</p>
<form method="post" action="/start">
 <label>Your name <input name="rater" id="rater" required maxlength="40" autofocus
  pattern="[A-Za-z0-9][A-Za-z0-9 ._\\-]{0,39}"></label>
 <button type="submit" id="start">Start</button>
</form>
<p><a href="/results">Results so far</a></p>"""

_ITEM = """<p class="progress" id="progress">{{ rater }}: {{ done }} of {{ total }} done</p>
<p class="prompt" id="prompt">“{{ item.prompt }}”</p>
<div class="pair">
 <figure><img id="left" src="/image/{{ left }}" alt="image 1"><figcaption>1 (left)</figcaption></figure>
 <figure><img id="right" src="/image/{{ right }}" alt="image 2"><figcaption>2 (right)</figcaption></figure>
</div>
<form method="post" action="/answer" id="answer">
 <input type="hidden" name="rater" value="{{ rater }}">
 <input type="hidden" name="item" value="{{ item.id }}">
 {% for question in questions %}
 <fieldset id="{{ question }}" data-question="{{ question }}">
  <legend>{{ question_text[question] }}</legend>
  {% for choice, label in [("left", "1: left"), ("right", "2: right"), ("same", "3: about the same")] %}
  <label><input type="radio" name="{{ question }}" value="{{ choice }}" required
   id="{{ question }}-{{ choice }}"> {{ label }}</label>
  {% endfor %}
 </fieldset>
 {% endfor %}
 <button type="submit" id="next">Next</button>
</form>
<script>
// Keys answer the highlighted question, then move to the next; the last answer submits.
const sets = [...document.querySelectorAll("fieldset[data-question]")];
const keys = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right",
              "3": "same", "ArrowDown": "same"};
let current = 0;
function highlight() { sets.forEach((s, i) => s.classList.toggle("current", i === current)); }
highlight();
document.addEventListener("keydown", (event) => {
  const choice = keys[event.key];
  if (!choice || current >= sets.length) return;
  event.preventDefault();
  sets[current].querySelector(`input[value="${choice}"]`).checked = true;
  current += 1;
  highlight();
  if (current === sets.length) document.getElementById("answer").submit();
});
</script>"""

_DONE = """<h1>Thank you, {{ rater }}</h1><p id="progress">{{ rater }}: {{ total }} of {{ total }}
done.</p><p><a href="/results">Results so far</a></p>"""

_RESULTS = """<h1>Results</h1>
<p>{{ summary.answers }} answers from {{ summary.raters }} raters; {{ dropped }} prompts that
not every run finished were left out. Rates with {{ summary.interval }} intervals;
"win" is the first run of the pair preferred.
<a href="/results.csv">CSV</a> · <a href="/results.json">JSON</a></p>
{% for pair in summary.pairs %}
<h2>{{ pair.runs[0] }} vs {{ pair.runs[1] }}</h2>
{% for question, groups in pair.questions.items() %}
<h3>{{ question_text[question] }}</h3>
<table class="results" data-question="{{ question }}">
<tr><th>group</th><th>answers</th><th>{{ pair.runs[0] }} wins</th><th>tie</th>
<th>{{ pair.runs[1] }} wins</th></tr>
{% for group_by, tallies in groups.items() %}{% for group, t in tallies.items() %}
<tr><td>{{ group_by }}{% if group %}: {{ group }}{% endif %}</td><td>{{ t.answers }}</td>
{% for k in ("win", "tie", "loss") %}<td>{{ "%.1f"|format(100 * t[k].rate) }}%
 [{{ "%.1f"|format(100 * t[k].low) }}, {{ "%.1f"|format(100 * t[k].high) }}]</td>{% endfor %}</tr>
{% endfor %}{% endfor %}
</table>
{% endfor %}
{% if pair.agreement %}<h3>Agreement between raters</h3><table>
<tr><th>raters</th><th>shared answers</th><th>agreement</th><th>Cohen's κ</th></tr>
{% for a in pair.agreement %}<tr><td>{{ a.raters|join(" & ") }}</td><td>{{ a.shared_answers }}</td>
<td>{{ "%.1f"|format(100 * a.agreement) }}%</td><td>{{ "%.2f"|format(a.cohen_kappa) }}</td></tr>
{% endfor %}</table>{% endif %}
{% endfor %}"""


def _page(title: str, body: str, **context) -> str:
  inner = flask.render_template_string(body, **context)
  return flask.render_template_string(_BASE, title=title, body=Markup(inner))


def create_app(rating_set: RatingSet, store: RatingStore) -> flask.Flask:
  """The app over `rating_set`'s items, answers going to `store`."""
  app = flask.Flask(__name__)
  app.config.update(PROPAGATE_EXCEPTIONS=False, MAX_CONTENT_LENGTH=64 * 1024)
  items = rating_set.by_id()
  # One opaque token per (item, run): the only way to name an image.
  salt = secrets.token_hex(8)
  tokens, images = {}, {}
  for item in rating_set.items:
    for run, path in zip(item.runs, item.images, strict=True):
      token = hashlib.sha256(f"{salt}\0{item.id}\0{run}".encode()).hexdigest()[:24]
      tokens[item.id, run] = token
      images[token] = path

  def checked_rater(name: str | None) -> str:
    name = (name or "").strip()
    if not RATER_NAME.fullmatch(name):
      flask.abort(400, "A rater's name is 1 to 40 letters, digits, spaces, dots, dashes or "
                       "underscores, starting with a letter or digit.")  # fmt: skip
    return name

  @app.get("/")
  def name_form():
    return _page("Rating", _NAME_FORM)

  @app.post("/start")
  def start():
    rater = checked_rater(flask.request.form.get("rater"))
    return flask.redirect(flask.url_for("rate", rater=rater), code=303)

  @app.get("/rate/<rater>")
  def rate(rater: str):
    rater = checked_rater(rater)
    answered = store.answered_items(rater)
    order = rating_set.order_for(rater)
    remaining = [item for item in order if item.id not in answered]
    done = len(order) - len(remaining)
    if not remaining:
      return _page("Done", _DONE, rater=rater, total=len(order))
    item = remaining[0]
    left = item.left_run(rater)
    right = item.runs[1] if left == item.runs[0] else item.runs[0]
    return _page(
      "Rating", _ITEM, rater=rater, item=item, done=done, total=len(order),
      left=tokens[item.id, left], right=tokens[item.id, right], questions=QUESTIONS,
      question_text=QUESTION_TEXT,
    )  # fmt: skip

  @app.post("/answer")
  def answer():
    form = flask.request.form
    rater = checked_rater(form.get("rater"))
    item = items.get(form.get("item", ""))
    if item is None:
      flask.abort(400, "Unknown item.")
    choices = {question: form.get(question) for question in QUESTIONS}
    if any(choice not in CHOICES for choice in choices.values()):
      flask.abort(400, f"Answer each of {list(QUESTIONS)} with one of {list(CHOICES)}.")
    store.answer(rater, item, item.left_run(rater), choices)  # Committed before the redirect.
    return flask.redirect(flask.url_for("rate", rater=rater), code=303)

  @app.get("/image/<token>")
  def image(token: str):
    path = images.get(token)
    if path is None:
      flask.abort(404, "No such image.")
    if not path.is_file():
      flask.abort(404, "This image's file is missing from its run's folder.")
    return flask.send_file(path, mimetype="image/png", max_age=3600)

  def summary():
    return results_lib.summarize(store.rows(), items)

  @app.get("/results")
  def results_page():
    return _page(
      "Results", _RESULTS, summary=summary(), dropped=rating_set.dropped_prompts,
      question_text=QUESTION_TEXT,
    )  # fmt: skip

  @app.get("/results.json")
  def results_json():
    body = {**summary(), "dropped_prompts": rating_set.dropped_prompts}
    return flask.Response(json.dumps(body, indent=1), mimetype="application/json")

  @app.get("/results.csv")
  def results_csv():
    return flask.Response(results_lib.to_csv(summary()), mimetype="text/csv")

  @app.errorhandler(HTTPException)
  def http_error(error: HTTPException):
    return flask.Response(f"{error.code} {error.name}: {error.description}\n",
                          status=error.code, mimetype="text/plain")  # fmt: skip

  @app.errorhandler(Exception)
  def server_error(error: Exception):
    app.logger.exception("Request failed: %s", error)  # In the server's log, not the page.
    return flask.Response("500 Internal Server Error\n", status=500, mimetype="text/plain")

  return app
