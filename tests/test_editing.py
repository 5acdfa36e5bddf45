"""Editing: kept tokens fed as given, requests and their regions, bad input, and the
shapes edit tasks."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import tiny_run_config, tiny_tokenizer_config
from PIL import Image

from parti.modeling.model import init_params
from parti.runtime.errors import ConfigError
from parti.sampling import decoding, editing
from parti.sampling.prompts import Prompt, read_prompts
from parti.tasks.shapes import edits, evaluate, render, spec

TOKENIZER = tiny_tokenizer_config()  # 32 px, a 4x4 grid of 8 px patches.


def _encode(images):
  """A stand-in for the tokenizer's encode: each patch's mean gray level, as a code."""
  patches = images.reshape(len(images), 4, 8, 4, 8, 3).mean(axis=(2, 4, 5))
  return (patches / 4).astype(np.int32)


def _image(path, side=32, value=200):
  Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(path)
  return str(path)


def test_kept_tokens_are_fed_as_given_and_scored_with_the_rest():
  config = tiny_run_config()
  params = jax.jit(lambda: init_params(config, jax.random.key(0)))()
  text = np.ones((4, config.text_length), np.int32)
  rng = np.random.default_rng(0)
  kept = rng.integers(0, config.image_vocab_size, (4, config.image_length)).astype(np.int32)
  keep = rng.random((4, config.image_length)) < 0.7
  keep[:, 5] = False  # Something to redraw in every row.
  sample = jax.jit(
    lambda rng, kept, keep: decoding.sample(
      config, params, text, rng, guidance_scale=2.0, keep=(kept, keep)
    )
  )
  tokens, log_probs = sample(jax.random.key(1), kept, keep)
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(tokens[keep], kept[keep])  # Identical outside the mask.
  assert not np.array_equal(tokens[~keep], kept[~keep])  # The rest was drawn.
  # The log-probabilities cover every token: those of a teacher-forced pass over them.
  forced, forced_lp = sample(jax.random.key(2), tokens, np.ones_like(keep))
  np.testing.assert_array_equal(np.asarray(forced), tokens)
  np.testing.assert_allclose(np.asarray(forced_lp), np.asarray(log_probs), atol=1e-4)


def test_regions_become_the_tokens_they_touch(tmp_path):
  image = _image(tmp_path / "a.png")
  box = editing.prepare(Prompt("x", image=image, box=(0, 0, 9, 8), source="r1"), TOKENIZER, _encode)
  # Pixels 0-8 wide touch the first two patches of the top row.
  assert np.flatnonzero(box.redraw).tolist() == [0, 1]
  assert box.tokens.shape == (16,) and box.image.shape == (32, 32, 3)
  mask = np.zeros((32, 32), np.uint8)
  mask[30:, 30:] = 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  masked = editing.prepare(
    Prompt("x", image=image, mask=str(tmp_path / "m.png"), source="r2"), TOKENIZER, _encode
  )
  assert np.flatnonzero(masked.redraw).tolist() == [15]
  # Outpainting: a 32x16 image extended by 16 px on the right fills the left half.
  narrow = tmp_path / "narrow.png"
  Image.fromarray(np.full((32, 16, 3), 40, np.uint8)).save(narrow)
  out = editing.prepare(
    Prompt("x", image=str(narrow), extend=(0, 16, 0, 0), source="r3"), TOKENIZER, _encode
  )
  assert out.redraw.reshape(4, 4)[:, 2:].all() and not out.redraw.reshape(4, 4)[:, :2].any()
  assert (out.image[:, :16] == 40).all()
  assert out.token_mask_image.shape == (32, 32) and out.token_mask_image[:, 16:].all()


def test_bad_edit_requests_are_refused_by_name(tmp_path):
  image = _image(tmp_path / "a.png")
  small = tmp_path / "small.png"
  Image.fromarray(np.zeros((16, 32), np.uint8)).save(small)
  empty = tmp_path / "empty.png"
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(empty)
  full = tmp_path / "full.png"
  Image.fromarray(np.full((32, 32), 255, np.uint8)).save(full)
  (tmp_path / "broken.png").write_bytes(b"not a png")
  cases = {
    "a mask must be its image.s size": dict(mask=str(small)),
    "is empty": dict(mask=str(empty)),
    "covers the whole image": dict(mask=str(full)),
    "mask .* cannot be read": dict(mask=str(tmp_path / "broken.png")),
    "not a box inside": dict(box=(10, 10, 40, 20)),
    "must add pixels": dict(extend=(0, 0, 0, 0)),
    "one of mask, box and extend": dict(box=(0, 0, 8, 8), extend=(0, 8, 0, 0)),
  }
  for message, fields in cases.items():
    prompt = Prompt("x", image=image, source="requests.jsonl:7", **fields)
    with pytest.raises(ConfigError, match=f"requests.jsonl:7.*{message}"):
      editing.prepare(prompt, TOKENIZER, _encode)
  with pytest.raises(ConfigError, match=r"requests\.jsonl:7: image .* cannot be read"):
    editing.prepare(
      Prompt("x", image=str(tmp_path / "broken.png"), box=(0, 0, 8, 8), source="requests.jsonl:7"),
      TOKENIZER, _encode,
    )  # fmt: skip


def test_edit_requests_are_read_and_checked(tmp_path):
  _image(tmp_path / "a.png")
  lines = [
    {"prompt": "a red circle", "image": "a.png", "box": [0, 0, 8, 8]},
    {"prompt": "a red circle", "image": "a.png", "extend": [0, 8, 0, 0]},
    {"prompt": "a red circle", "image": "a.png", "mask": "a.png"},
  ]
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines))
  prompts = read_prompts(str(path))
  assert [p.box for p in prompts] == [(0, 0, 8, 8), None, None]
  assert prompts[1].extend == (0, 8, 0, 0) and prompts[2].mask.endswith("a.png")
  assert len({p.key for p in prompts}) == 3 and all(editing.is_edit(p) for p in prompts)
  bad = {
    "should be 4 integers": {"prompt": "x", "image": "a.png", "box": [0, 0, 8]},
    "there is no 'image'": {"prompt": "x", "box": [0, 0, 8, 8]},
    "lies outside": {"prompt": "x", "image": "a.png", "mask": "/etc/passwd"},
  }
  for message, request in bad.items():
    path.write_text(json.dumps(request))
    with pytest.raises(ConfigError, match=message):
      read_prompts(str(path))


@pytest.mark.parametrize("placement", spec.PLACEMENTS)
@pytest.mark.parametrize("kind", edits.KINDS)
def test_shapes_edit_tasks_are_repeatable_and_consistent(kind, placement):
  first = [edits.make_task(0, kind, i, placement=placement) for i in range(6)]
  assert first == [edits.make_task(0, kind, i, placement=placement) for i in range(6)]
  for task in first:
    # Every object of both scenes sits as the placement puts it (the demo's models
    # are trained on centered objects, and benchmarked so).
    objects = task.source.objects + task.target.objects
    off_center = [
      o for o in objects
      if not np.allclose(o.center, ((o.position // 3 + 0.5) / 3, (o.position % 3 + 0.5) / 3))
    ]  # fmt: skip
    assert bool(off_center) == (placement == "jittered")
    target = render.render(task.target, 48)
    assert evaluate.score(target, task.target)["all"] or task.kind == "reshape"
    assert edits.preserved(target, task)

    # Outside the cells to redraw, source and target are the same scene.
    def outside(scene, cells=task.cells):
      return sorted(
        (o.color, o.shape, o.position) for o in scene.objects if o.position not in cells
      )

    assert outside(task.source) == outside(task.target)
    changed = [o for o in task.target.objects if o.position in task.cells]
    assert changed or kind == "remove"
    if task.crop:
      assert task.source_image(48).shape[:2] != (48, 48)
      assert sum(task.extend(48)) == 16


def test_refining_one_token_finds_the_likeliest_whole_sequence():
  config = tiny_run_config()
  params = jax.jit(lambda: init_params(config, jax.random.key(0)))()
  text = np.ones((2, config.text_length), np.int32)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, config.image_vocab_size, (2, config.image_length)).astype(np.int32)
  redraw = np.zeros_like(tokens, bool)
  redraw[0, 6], redraw[1, 11] = True, True
  refined, scores = jax.jit(
    lambda p, t, x, r: editing.refine(config, p, t, x, r, guidance_scale=2.0, top_k=0)
  )(params, text, tokens, redraw)
  refined = np.asarray(refined)
  np.testing.assert_array_equal(refined[~redraw], tokens[~redraw])
  score_all = jax.jit(
    lambda candidates: editing.sequence_log_likelihood(
      config, params, text[:1], candidates, 2.0, repeat=len(candidates)
    )
  )
  for row, position in ((0, 6), (1, 11)):
    # Every code at that position, scored by the whole sequence: refine chose the best.
    candidates = np.repeat(tokens[row : row + 1], config.image_vocab_size, axis=0)
    candidates[:, position] = np.arange(config.image_vocab_size)
    likelihood = score_all(candidates)
    assert refined[row, position] == int(np.argmax(likelihood))
    assert float(scores[row]) == pytest.approx(float(np.max(likelihood)), abs=1e-3)
  # The uncached score is the cached sampler's: feeding every token gives the same sum.
  _, cached = jax.jit(
    lambda tokens: decoding.sample(
      config, params, text, jax.random.key(0), guidance_scale=2.0,
      keep=(tokens, np.ones_like(redraw)),
    )
  )(refined)  # fmt: skip
  np.testing.assert_allclose(np.asarray(cached).sum(-1), np.asarray(scores), atol=1e-3)


def test_an_unknown_placement_is_refused_by_name():
  with pytest.raises(ValueError, match="Unknown placement 'middle'"):
    edits.make_task(0, "recolor", 0, placement="middle")
