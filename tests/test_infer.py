"""The batch inference job: outputs, resume, determinism, bad prompts and refused checkpoints."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from helpers import (
  as_gin,
  decompression_bomb_png,
  module_params,
  read_geneval_folder,
  run_on_two_hosts,
  tiny_run_config,
  tiny_tokenizer_config,
)
from PIL import Image

from parti import infer, partitioning
from parti.evaluation import shapes_report
from parti.modeling.config import PartiConfig
from parti.runtime.errors import ConfigError
from parti.sampling import generation
from parti.sampling.prompts import Prompt, PromptEncoder, shapes_vocabulary_path
from parti.training import checkpoints
from parti.training.trainer import PartiTrainer

pytestmark = pytest.mark.slow

MESH = partitioning.MeshConfig(data=4, model=2, rules="model_parallel")
OPTIONS = infer.SamplingOptions(guidance_scale=2.0, top_k=16, samples=2, keep=1, seed=3)


def _save_run(model_dir, config: PartiConfig, step: int = 7):
  """A Parti run folder (config and one checkpoint of random parameters), as train writes."""
  from flax import linen as nn

  from parti.training import optim

  trainer = PartiTrainer(config, optim.adafactor(optim.AdafactorConfig()))
  params = jax.jit(lambda: nn.meta.unbox(trainer.init_params(jax.random.key(0))))()
  model_dir.mkdir(parents=True, exist_ok=True)
  config.save(model_dir / "parti_config.json")
  saver = checkpoints.Checkpointer(model_dir)
  saver.save(step, {"params": params})
  saver.close()
  return str(model_dir)


@pytest.fixture(scope="module")
def parti_run(tmp_path_factory):
  return _save_run(tmp_path_factory.mktemp("parti"), tiny_run_config())


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
  lines = [
    b"a red circle",
    b"",  # blank: skipped
    b"two blue squares <b>&",
    b"a red circle",  # repeated: generated once
    b"a green star " + b"and a star " * 20,  # longer than 16 tokens: truncated
    b"a caf\xe9 triangle",  # not UTF-8: replaced
    b"three yellow stars",
  ]
  path.write_bytes(b"\n".join(lines) + b"\n")
  return path


def run(out, parti_run, tokenizer, prompts, **overrides):
  args = dict(
    checkpoint_dir=parti_run, tokenizer_dir=str(tokenizer), prompts=str(prompts),
    output_dir=str(out), options=OPTIONS, batch_size=4, mesh=MESH, gallery_every=1,
  )  # fmt: skip
  return infer.infer(**{**args, **overrides})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, parti_run, trained_tokenizer, prompts_file):
  out = tmp_path_factory.mktemp("infer")
  return out, run(out, parti_run, trained_tokenizer, prompts_file)


def _manifest(out) -> list[dict]:
  return [
    json.loads(line)
    for path in sorted(out.glob("manifest-*.jsonl"))
    for line in path.read_text().splitlines()
  ]


def test_every_prompt_gets_images_a_manifest_line_and_a_gallery_card(first_run, caplog):
  out, entries = first_run
  prompts = [e["prompt"] for e in entries]
  assert len(prompts) == 5 == len(set(prompts))  # Blank skipped, repeat generated once.
  assert "a caf\ufffd triangle" in prompts
  assert [e["index"] for e in entries] == list(range(5))
  assert _manifest(out) == entries
  for entry in entries:
    assert entry["checkpoint_step"] == 7 and entry["guidance_scale"] == 2.0
    assert len(entry["files"]) == 1 and len(entry["scores"]) == 1
    image = np.asarray(Image.open(out / entry["files"][0]))
    assert image.shape == (32, 32, 3)
  page = (out / infer.GALLERY).read_text()
  assert page.count('class="card"') == 5
  assert "two blue squares &lt;b&gt;&amp;" in page  # Escaped.
  assert not list(out.rglob("*.tmp"))
  timing = json.loads((out / "timing-00000.json").read_text())
  assert timing["calls"] >= 1
  assert 0 <= timing["sampler_seconds_after_first_call"] <= timing["seconds_after_first_call"]
  assert timing["loading_seconds"] > 0 and timing["first_call_seconds"] > 0


def test_long_prompts_are_truncated_with_a_warning_that_names_them(caplog):
  encoder = PromptEncoder(16)
  with caplog.at_level("WARNING"):
    tokens = encoder.encode("a green star " + "and a star " * 20)
  assert "truncated" in caplog.text and "a green star" in caplog.text
  assert tokens[-1] == 1 and (tokens > 0).all()  # 15 pieces, then EOS.


def test_a_rerun_skips_finished_prompts_and_a_killed_run_loses_nothing(
  tmp_path, parti_run, trained_tokenizer, prompts_file, first_run, monkeypatch
):
  out, expected = first_run
  assert run(out, parti_run, trained_tokenizer, prompts_file) == []  # All done.

  # A kill after the second prompt's files but before its manifest line.
  killed = tmp_path / "killed"
  original = infer._write_prompt
  calls = {"n": 0}

  def write_then_die(*args, **kwargs):
    calls["n"] += 1
    entry = original(*args, **kwargs)
    if calls["n"] == 2:
      raise KeyboardInterrupt
    return entry

  monkeypatch.setattr(infer, "_write_prompt", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    run(killed, parti_run, trained_tokenizer, prompts_file)
  monkeypatch.setattr(infer, "_write_prompt", original)
  assert [e["index"] for e in _manifest(killed)] == [0]
  resumed = run(killed, parti_run, trained_tokenizer, prompts_file)
  assert [e["index"] for e in resumed] == [1, 2, 3, 4]
  # The same images as the uninterrupted run: each prompt's seed is its own.
  for entry in expected:
    name = entry["files"][0]
    assert (killed / name).read_bytes() == (out / name).read_bytes(), entry["prompt"]


def test_images_do_not_depend_on_the_batch_or_the_prompt_order(
  tmp_path, parti_run, trained_tokenizer, first_run
):
  out, expected = first_run
  reordered = tmp_path / "reordered.txt"
  texts = [e["prompt"] for e in expected][::-1]
  reordered.write_text("\n".join(texts) + "\n")
  entries = run(tmp_path / "out", parti_run, trained_tokenizer, reordered, batch_size=8)
  by_prompt = {e["prompt"]: e for e in entries}
  for entry in expected:
    mine = by_prompt[entry["prompt"]]
    assert mine["seed"] == entry["seed"]
    # The same tokens (another token would move the log-likelihood by far more)...
    assert mine["log_likelihoods"] == pytest.approx(entry["log_likelihoods"], rel=1e-5)
    # ... decoded in a batch of another size, where float rounding may move a pixel by
    # one level: byte equality holds only for batches of the same shape.
    theirs = np.asarray(Image.open(out / entry["files"][0]), np.int16)
    ours = np.asarray(Image.open(tmp_path / "out" / mine["files"][0]), np.int16)
    assert np.abs(ours - theirs).max() <= 1


def test_parti_prompts_keep_category_and_challenge_and_keep_the_best_samples(
  tmp_path, parti_run, trained_tokenizer
):
  tsv = tmp_path / "prompts.tsv"
  tsv.write_text(
    "Prompt\tCategory\tChallenge\tNote\n"
    "a red circle\tAbstract\tBasic\t\n"
    "two blue squares\tArtifacts\tQuantity\t\n"
  )
  options = infer.SamplingOptions(guidance_scale=1.0, samples=4, keep=2, seed=1)
  entries = run(tmp_path / "out", parti_run, trained_tokenizer, tsv, options=options, batch_size=2)
  assert [(e["category"], e["challenge"]) for e in entries] == [
    ("Abstract", "Basic"), ("Artifacts", "Quantity"),
  ]  # fmt: skip
  for entry in entries:
    assert len(entry["files"]) == 2 and entry["scores"][0] >= entry["scores"][1]
  report = (tmp_path / "out" / infer.REPORT).read_text()
  assert f"| Abstract | 1 | {entries[0]['scores'][0]:.2f} |" in report
  assert f"| Quantity | 1 | {entries[1]['scores'][0]:.2f} |" in report


def test_a_reranker_keeps_the_samples_it_scores_best(
  tmp_path, parti_run, trained_tokenizer, trained_reranker
):
  from parti.sampling.rerank import Reranker

  reranker_dir, _ = trained_reranker
  tsv = tmp_path / "prompts.tsv"
  tsv.write_text(
    "Prompt\tCategory\tChallenge\n"
    "a red circle\tAbstract\tBasic\n"
    "two blue squares\tArtifacts\tQuantity\n"
  )
  options = infer.SamplingOptions(guidance_scale=1.0, samples=4, keep=4, seed=2)
  out = tmp_path / "out"
  entries = run(
    out, parti_run, trained_tokenizer, tsv, options=options, batch_size=2,
    reranker_dir=str(reranker_dir),
  )  # fmt: skip
  reranker = Reranker.from_checkpoint(reranker_dir)
  for entry in entries:
    assert entry["score"] == "reranker_cosine" and len(entry["log_likelihoods"]) == 4
    assert entry["scores"] == sorted(entry["scores"], reverse=True)
    # The manifest's scores are the reranker's scores of the written images.
    images = np.stack([np.asarray(Image.open(out / n), np.float32) / 255 for n in entry["files"]])
    np.testing.assert_allclose(
      reranker.score(images, [entry["prompt"]] * 4), entry["scores"], atol=0.02
    )
    assert entry["clip_score"] == pytest.approx(100 * max(entry["scores"][0], 0.0), abs=1e-4)
  options_record = json.loads((out / infer.OPTIONS_FILE).read_text())
  assert options_record["reranker_step"] == reranker.step
  report = (out / infer.REPORT).read_text()
  assert "mean CLIP score" in report
  assert (
    f"| Abstract | 1 | {entries[0]['scores'][0]:.2f} | {entries[0]['clip_score']:.1f} |" in report
  )
  # The images themselves do not depend on the reranker: only their order does.
  plain = run(tmp_path / "plain", parti_run, trained_tokenizer, tsv, options=options, batch_size=2)
  for ranked, unranked in zip(entries, plain, strict=True):
    assert sorted(ranked["log_likelihoods"]) == pytest.approx(sorted(unranked["log_likelihoods"]))
  with pytest.raises(ConfigError, match="not a contrastive model run"):
    run(tmp_path / "x", parti_run, trained_tokenizer, tsv, reranker_dir=str(tmp_path))


def test_refusals_are_clear(tmp_path, parti_run, trained_tokenizer, prompts_file, first_run):
  out, _ = first_run
  with pytest.raises(ConfigError, match=r"other \['seed'\]"):
    run(
      out, parti_run, trained_tokenizer, prompts_file, options=dataclasses.replace(OPTIONS, seed=4)
    )
  with pytest.raises(ConfigError, match="not a Parti run"):
    run(tmp_path / "a", str(tmp_path / "nothing"), trained_tokenizer, prompts_file)
  other = _save_run(tmp_path / "parti128", tiny_run_config(image_vocab_size=128))
  with pytest.raises(ConfigError, match="has 64 codes, but the model writes 128"):
    run(tmp_path / "b", other, trained_tokenizer, prompts_file)
  with pytest.raises(ConfigError, match="not found"):
    run(tmp_path / "c", parti_run, trained_tokenizer, tmp_path / "missing.txt")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ConfigError, match="has no prompts"):
    run(tmp_path / "d", parti_run, trained_tokenizer, empty)
  with pytest.raises(ConfigError, match="Keep 1 to"):
    infer.SamplingOptions(samples=2, keep=3)


def test_prompt_encoding_matches_the_training_tasks(shapes_task_name):
  import seqio

  task = seqio.get_mixture_or_task(shapes_task_name)
  encoder = PromptEncoder(32, shapes_vocabulary_path())
  dataset = task.get_dataset({"inputs": 32, "image": 32}, split="validation", shuffle=False)
  vocabulary = task.output_features["inputs"].vocabulary
  for example in dataset.take(4).as_numpy_iterator():
    caption = vocabulary.decode([int(t) for t in example["inputs"] if t > 1])
    expected = np.zeros(32, np.int32)
    expected[: len(example["inputs"])] = example["inputs"]
    np.testing.assert_array_equal(encoder.encode(caption), expected)


# --- Shapes evaluation -----------------------------------------------------------------------


def test_shapes_evaluation_writes_a_report_per_guidance_scale(
  tmp_path, parti_run, trained_tokenizer
):
  from parti import evaluate_shapes

  results = evaluate_shapes.evaluate_shapes(
    checkpoint_dir=parti_run, tokenizer_dir=str(trained_tokenizer), output_dir=str(tmp_path),
    guidance_scales=(1.0, 3.0), examples=6, batch_size=4, mesh=MESH, plausibility=0.3,
  )  # fmt: skip
  assert sorted(results) == ["1.0", "3.0"]
  for by_split in results.values():
    assert sorted(by_split) == ["compositional", "test"]
    assert all(table["overall"]["prompts"] == 6 for table in by_split.values())
  saved = json.loads((tmp_path / shapes_report.REPORT_JSON).read_text())
  assert saved["results"] == results and saved["step"] == 7
  assert saved["sampling"] == {"temperature": 1.0, "top_k": 0, "plausibility": 0.3}
  report = (tmp_path / shapes_report.REPORT).read_text()
  assert "| 3.0 |" in report and "λ = 1.0, compositional" in report
  assert "plausibility 0.3" in report
  assert Image.open(tmp_path / shapes_report.PLOT).size == (560, 360)
  assert (tmp_path / "samples_test_guidance_3.0.png").is_file()


def test_shapes_evaluation_scores_each_image_against_its_own_prompt(
  tmp_path, parti_run, trained_tokenizer, trained_reranker, monkeypatch
):
  from parti import evaluate_shapes
  from parti.sampling.rerank import Reranker
  from parti.tasks.shapes import render, scenes

  def ground_truth(generate, params, tok_params, split_scenes, *args):
    return [render.render(scene, 64) for scene in split_scenes]

  monkeypatch.setattr(evaluate_shapes, "_generate", ground_truth)
  results = evaluate_shapes.evaluate_shapes(
    checkpoint_dir=parti_run, tokenizer_dir=str(trained_tokenizer), output_dir=str(tmp_path),
    guidance_scales=(1.0,), examples=12, batch_size=4, mesh=MESH,
    reranker_dir=str(trained_reranker[0]),
  )  # fmt: skip
  # The evaluator scores every ground-truth image at 64 px right.
  for table in results["1.0"].values():
    assert table["overall"]["all"] == 1.0
  # The CLIP-style score is the reranker's, on the same images and prompts.
  saved = json.loads((tmp_path / shapes_report.REPORT_JSON).read_text())
  test_scenes = [scenes.make_scene(0, "test", i) for i in range(12)]
  cosine = Reranker.from_checkpoint(trained_reranker[0]).score(
    np.stack([render.render(s, 64) for s in test_scenes]) / 255.0, [s.caption for s in test_scenes]
  )
  expected = float(np.mean(100 * np.maximum(cosine, 0)))
  assert saved["clip_scores"]["1.0"]["test"] == pytest.approx(expected, abs=1e-3)
  assert "CLIP-style score" in (tmp_path / shapes_report.REPORT).read_text()


def test_the_learning_curve_scores_every_kept_checkpoint_against_training_time(
  tmp_path, trained_tokenizer, monkeypatch
):
  from parti import evaluate_shapes
  from parti.tasks.shapes import render

  run_dir = tmp_path / "run"
  _save_run(run_dir, tiny_run_config(), step=3)
  _save_run(run_dir, tiny_run_config(), step=7)
  rows = [{"step": 3, "perf/train_seconds": 1.5}, {"step": 7, "perf/train_seconds": 4.0}]
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  calls = []

  def truth_except_at_step_3(generate, params, tok_params, split_scenes, *args):
    # Calls come as the λ sweep (one per split), then the curve's checkpoints in order.
    calls.append(len(split_scenes))
    blank = 3 <= len(calls) <= 4
    return [render.render(s, 64) * (0 if blank else 1) for s in split_scenes]

  monkeypatch.setattr(evaluate_shapes, "_generate", truth_except_at_step_3)
  evaluate_shapes.evaluate_shapes(
    checkpoint_dir=str(run_dir), tokenizer_dir=str(trained_tokenizer),
    output_dir=str(tmp_path / "eval"), guidance_scales=(1.0,), examples=6, batch_size=4,
    mesh=MESH, learning_curve_examples=4, learning_curve_scale=2.0,
  )  # fmt: skip
  assert calls == [6, 6, 4, 4, 4, 4]
  saved = json.loads((tmp_path / "eval" / shapes_report.REPORT_JSON).read_text())
  curve = saved["learning_curve"]
  assert curve["guidance_scale"] == 2.0
  assert [(p["step"], p["train_seconds"]) for p in curve["points"]] == [(3, 1.5), (7, 4.0)]
  assert [p["all"] for p in curve["points"]] == [
    {"test": 0.0, "compositional": 0.0},
    {"test": 1.0, "compositional": 1.0},
  ]
  report = (tmp_path / "eval" / shapes_report.REPORT).read_text()
  assert "| 7 | 4 | 100.0% | 100.0% |" in report and "4 prompts per split" in report
  assert Image.open(tmp_path / "eval" / shapes_report.CURVE_PLOT).size == (560, 360)
  # A run whose metrics lack the time of a checkpoint is plotted against steps instead.
  (run_dir / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
  calls.clear()
  evaluate_shapes.evaluate_shapes(
    checkpoint_dir=str(run_dir), tokenizer_dir=str(trained_tokenizer),
    output_dir=str(tmp_path / "untimed"), guidance_scales=(1.0,), examples=6, batch_size=4,
    mesh=MESH, learning_curve_examples=4,
  )  # fmt: skip
  assert "| 3 | - | 0.0% | 0.0% |" in (tmp_path / "untimed" / shapes_report.REPORT).read_text()
  assert (tmp_path / "untimed" / shapes_report.CURVE_PLOT).is_file()


def test_shapes_evaluation_refuses_unknown_splits(tmp_path, parti_run, trained_tokenizer):
  from parti import evaluate_shapes

  with pytest.raises(ConfigError, match="known splits"):
    evaluate_shapes.evaluate_shapes(
      checkpoint_dir=parti_run, tokenizer_dir=str(trained_tokenizer), output_dir=str(tmp_path),
      splits=("holdout",), mesh=MESH,
    )  # fmt: skip


def test_prompt_report_groups_best_scores():
  from parti.evaluation import prompt_report

  entries = [
    {"category": "Animals", "challenge": "Basic", "scores": [-10.0, -12.0]},
    {"category": "Animals", "challenge": "", "scores": [-20.0]},
    {"category": "Vehicles", "challenge": "Basic", "scores": [-4.0]},
  ]
  assert prompt_report.group_scores(entries, "category") == {
    "Animals": (2, -15.0), "Vehicles": (1, -4.0),
  }  # fmt: skip
  assert prompt_report.group_scores(entries, "challenge") == {
    "Basic": (2, -7.0),
    "(none)": (1, -20.0),
  }
  assert "| Vehicles | 1 | -4.00 |" in prompt_report.markdown(entries)
  with pytest.raises(ValueError, match="Group by"):
    prompt_report.group_scores(entries, "note")


def _requests(path, requests: list) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in requests))
  return str(path)


def test_requests_set_their_own_seed_and_guidance_scale(tmp_path, parti_run, trained_tokenizer):
  requests = _requests(
    tmp_path / "requests.jsonl",
    [
      {"prompt": "a red circle", "seed": 11, "guidance_scale": 3.0},
      {"prompt": "a red circle", "seed": 12},  # Another request: another seed.
      {"prompt": "a red circle", "seed": 11, "guidance_scale": 3.0},  # Repeated: once.
      {"prompt": "two blue squares", "category": "Artifacts"},
    ],
  )
  entries = run(tmp_path / "mixed", parti_run, trained_tokenizer, requests)
  assert [(e["seed"], e["guidance_scale"]) for e in entries[:2]] == [(11, 3.0), (12, 2.0)]
  assert entries[2]["seed"] == generation.prompt_seed(OPTIONS.seed, Prompt("two blue squares"))
  assert entries[2]["category"] == "Artifacts" and entries[2]["guidance_scale"] == 2.0
  # A request's own scale draws what a run at that scale draws for it.
  alone = _requests(tmp_path / "alone.jsonl", [{"prompt": "a red circle", "seed": 11}])
  options = dataclasses.replace(OPTIONS, guidance_scale=3.0)
  [same] = run(tmp_path / "alone", parti_run, trained_tokenizer, alone, options=options)
  assert (tmp_path / "alone" / same["files"][0]).read_bytes() == (
    tmp_path / "mixed" / entries[0]["files"][0]
  ).read_bytes()
  # A rerun finds every request done, the two of one prompt apart.
  assert run(tmp_path / "mixed", parti_run, trained_tokenizer, requests) == []


def test_image_completion_continues_the_given_rows(
  tmp_path, parti_run, trained_tokenizer, monkeypatch
):
  from parti.sampling import decoding
  from parti.tasks import records
  from parti.tokenizer.api import ImageTokenizer

  pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
  Image.fromarray(pixels).save(tmp_path / "given.png")
  requests = _requests(
    tmp_path / "requests.jsonl", [{"prompt": "a red circle", "image": "given.png"}]
  )
  sampled = []
  real_sample = decoding.sample

  def recording_sample(*args, **kwargs):
    tokens, log_probs = real_sample(*args, **kwargs)
    jax.debug.callback(lambda t: sampled.append(np.asarray(t)), tokens)
    return tokens, log_probs

  monkeypatch.setattr(decoding, "sample", recording_sample)
  out = tmp_path / "out"
  options = dataclasses.replace(OPTIONS, prefix_rows=2, samples=2, keep=2)
  [entry] = run(out, parti_run, trained_tokenizer, requests, options=options, batch_size=4)
  jax.effects_barrier()
  tokenizer = ImageTokenizer.from_checkpoint(trained_tokenizer)
  given = tokenizer.encode(records.resize_and_crop(pixels, 32)[None])[0]
  tokens = np.concatenate(sampled)[:2].reshape(2, 4, 4)  # Both samples of the one request.
  np.testing.assert_array_equal(tokens[:, :2], np.stack([given[:2]] * 2))
  assert entry["prefix_rows"] == 2 and entry["image"].endswith("given.png")
  shown = np.asarray(Image.open(out / entry["prefix_file"]))
  np.testing.assert_array_equal(shown[:16], records.resize_and_crop(pixels, 32)[:16])
  page = (out / infer.GALLERY).read_text()
  assert entry["prefix_file"] in page and 'class="given"' in page


def test_image_completion_refuses_what_it_cannot_complete(tmp_path, parti_run, trained_tokenizer):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  (tmp_path / "bomb.png").write_bytes(decompression_bomb_png())
  with_images = _requests(
    tmp_path / "images.jsonl",
    [
      {"prompt": "a red circle", "image": "broken.png"},
      {"prompt": "a blue square", "image": "gone.png"},
      {"prompt": "a green star", "image": "bomb.png"},
    ],
  )
  complete = dataclasses.replace(OPTIONS, prefix_rows=1)
  with pytest.raises(
    ConfigError,
    match=r"3 images to complete cannot be read: .*broken\.png.*gone.*bomb\.png .*pixel limit",
  ):
    run(tmp_path / "a", parti_run, trained_tokenizer, with_images, options=complete)
  with pytest.raises(ConfigError, match=r"names an image to complete, but .*prefix_rows is 0"):
    run(tmp_path / "b", parti_run, trained_tokenizer, with_images)
  whole = dataclasses.replace(OPTIONS, prefix_rows=4)
  with pytest.raises(ConfigError, match="leaves nothing of a 4-row grid"):
    run(tmp_path / "c", parti_run, trained_tokenizer, with_images, options=whole)
  plain = _requests(tmp_path / "plain.jsonl", [{"prompt": "a red circle"}])
  with pytest.raises(ConfigError, match="every request needs an 'image'"):
    run(tmp_path / "d", parti_run, trained_tokenizer, plain, options=complete)
  assert not list((tmp_path / "a").rglob("*.png"))  # Refused before anything was made.


def test_two_processes_of_four_devices_write_what_one_of_eight_does(
  tmp_path, parti_run, trained_tokenizer
):
  # Five requests in batches of four: the second batch has one prompt, so host 1
  # pads with host 0's. They are edits, so each host also encodes its requests'
  # images, as image completion does (which runs the same reading and encoding on
  # each host, and is tested on one process above).
  rng = np.random.default_rng(1)
  requests = []
  for index, text in enumerate(["a red circle", "two blue squares", "a star", "a cross", "x"]):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(tmp_path / f"{index}.png")
    box = [6 * index, 8, 6 * index + 8, 24]  # Each its own region.
    requests.append({"prompt": text, "image": f"{index}.png", "seed": index, "box": box})
  prompts = _requests(tmp_path / "requests.jsonl", requests)
  one = run(tmp_path / "one", parti_run, trained_tokenizer, prompts)

  args = dict(
    checkpoint_dir=parti_run, tokenizer_dir=str(trained_tokenizer), prompts=prompts,
    output_dir=str(tmp_path / "two"), options=OPTIONS, batch_size=4, mesh=MESH,
  )  # fmt: skip
  (tmp_path / "two.gin").write_text(as_gin("infer", args))
  run_on_two_hosts(["-m", "parti.infer", f"--gin_file={tmp_path / 'two.gin'}"], tmp_path)

  two = tmp_path / "two"
  per_host = [
    [
      json.loads(line)["index"]
      for line in (two / f"manifest-{h:05d}.jsonl").read_text().splitlines()
    ]
    for h in range(2)
  ]
  assert per_host == [[0, 1, 4], [2, 3]]  # Each host its half of each batch; no padding.
  by_index = {e["index"]: e for e in _manifest(two)}
  for entry in one:
    theirs = by_index[entry["index"]]
    assert theirs["scores"] == pytest.approx(entry["scores"], rel=1e-5)
    for name in [*entry["files"], entry["edit"]["input_file"]]:
      assert (two / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
  assert (two / infer.GALLERY).read_text().count('class="card"') == 5


def test_a_prompt_inserted_above_finished_ones_never_overwrites_their_images(
  tmp_path, parti_run, trained_tokenizer
):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\ntwo blue squares\n")
  run(tmp_path / "out", parti_run, trained_tokenizer, prompts)
  before = {e["prompt"]: e for e in _manifest(tmp_path / "out")}
  pixels = {p: (tmp_path / "out" / e["files"][0]).read_bytes() for p, e in before.items()}
  prompts.write_text("three yellow stars\na red circle\ntwo blue squares\n")
  added = run(tmp_path / "out", parti_run, trained_tokenizer, prompts)
  assert [e["prompt"] for e in added] == ["three yellow stars"]
  entries = _manifest(tmp_path / "out")
  names = [name for e in entries for name in e["files"]]
  assert len(entries) == 3 and len(set(names)) == 3  # One file per request, none shared.
  assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3
  for prompt, data in pixels.items():
    assert (tmp_path / "out" / before[prompt]["files"][0]).read_bytes() == data


def test_reading_a_run_with_a_corrupt_latest_checkpoint_moves_nothing(tmp_path, caplog):
  from parti.modeling import checkpoint_io

  model_dir = pathlib.Path(_save_run(tmp_path / "run", tiny_run_config(), step=5))
  _save_run(model_dir, tiny_run_config(), step=7)
  for path in (model_dir / "checkpoints" / "7").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "params" in str(path):
      path.write_bytes(b"corrupt")
  listing = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*"))
  mesh = partitioning.create_mesh(MESH)
  with caplog.at_level("WARNING"):
    _, _, _, step = checkpoint_io.load_params(model_dir, mesh, partitioning.rules_for(MESH))
  assert step == 5
  assert "Using checkpoint 5" in caplog.text and "[7]" in caplog.text
  assert max(len(line) for line in caplog.text.splitlines()) < 600  # No TensorStore dump.
  assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")) == listing


def test_a_run_that_failed_before_its_first_image_leaves_the_folder_usable(
  tmp_path, parti_run, trained_tokenizer
):
  requests = _requests(tmp_path / "r.jsonl", [{"prompt": "a red circle", "image": "gone.png"}])
  with pytest.raises(ConfigError, match="cannot be read"):
    run(tmp_path / "out", parti_run, trained_tokenizer, requests,
        options=dataclasses.replace(OPTIONS, prefix_rows=1))  # fmt: skip
  plain = tmp_path / "plain.txt"
  plain.write_text("a red circle\n")
  [entry] = run(tmp_path / "out", parti_run, trained_tokenizer, plain,
                options=dataclasses.replace(OPTIONS, seed=5))  # fmt: skip
  assert (tmp_path / "out" / entry["files"][0]).is_file()
  assert json.loads((tmp_path / "out" / infer.OPTIONS_FILE).read_text())["seed"] == 5
  with pytest.raises(ConfigError, match=r"other \['seed'\]"):  # Now it holds an image.
    run(tmp_path / "out", parti_run, trained_tokenizer, plain, options=OPTIONS)


def _save_upsampler(model_dir, config, step: int = 5):
  """An upsampler run folder (config and one checkpoint of random parameters)."""
  from parti.upsampling import checkpoint_io, model

  images = np.zeros((1, config.input_size, config.input_size, 3), np.float32)
  params = module_params(model.WDSR(config), images)
  # Nonzero output convolutions, so the upsampled images are not plain bicubic.
  params = jax.tree_util.tree_map(lambda x: x + 0.01, params)
  model_dir.mkdir(parents=True, exist_ok=True)
  config.save(model_dir / checkpoint_io.CONFIG_FILE)
  saver = checkpoints.Checkpointer(model_dir)
  saver.save(step, {"params": params})
  saver.close()
  return str(model_dir)


def test_an_upsampler_writes_each_kept_image_larger_beside_it(
  tmp_path, parti_run, trained_tokenizer, prompts_file, first_run
):
  from parti.upsampling.config import UpsamplerConfig

  config = UpsamplerConfig(input_size=32, scale=2, num_blocks=1, features=8, dtype="float32")
  upsampler_dir = _save_upsampler(tmp_path / "upsampler", config)
  out = tmp_path / "large"
  entries = run(out, parti_run, trained_tokenizer, prompts_file, upsampler_dir=upsampler_dir)
  plain, _ = first_run
  assert len(entries) == 5
  for entry in entries:
    assert entry["upsampler_scale"] == 2 and len(entry["upsampled_files"]) == 1
    small = np.asarray(Image.open(out / entry["files"][0]))
    large = np.asarray(Image.open(out / entry["upsampled_files"][0]))
    assert large.shape == (64, 64, 3)
    # The tokenizer-size image is the one the run without an upsampler wrote.
    assert small.tobytes() == np.asarray(Image.open(plain / entry["files"][0])).tobytes()
  options = json.loads((out / infer.OPTIONS_FILE).read_text())
  assert options["upsampler_step"] == 5
  page = (out / infer.GALLERY).read_text()
  assert page.count('class="small"') == 5 and entries[0]["upsampled_files"][0] in page
  # A lost upsampled file makes its prompt unfinished: a rerun writes it again.
  (out / entries[1]["upsampled_files"][0]).unlink()
  redone = run(out, parti_run, trained_tokenizer, prompts_file, upsampler_dir=upsampler_dir)
  assert [e["index"] for e in redone] == [1]
  # FID and CLIP score read either size.
  from parti import evaluate_images

  paths, _ = evaluate_images._generated(str(out), upsampled=True)
  assert [p.name for p in paths] == [pathlib.Path(e["upsampled_files"][0]).name for e in entries]
  with pytest.raises(ConfigError, match="without an upsampled version"):
    evaluate_images._generated(str(plain), upsampled=True)
  # Another input size than the tokenizer's images, or no upsampler at all: refused.
  other = _save_upsampler(tmp_path / "upsampler16", dataclasses.replace(config, input_size=16))
  with pytest.raises(ConfigError, match="takes 16 px images, but the tokenizer makes 32 px"):
    run(tmp_path / "e", parti_run, trained_tokenizer, prompts_file, upsampler_dir=other)
  with pytest.raises(ConfigError, match="holds no trained upsampler"):
    run(tmp_path / "f", parti_run, trained_tokenizer, prompts_file, upsampler_dir=str(tmp_path))


def test_edit_requests_redraw_their_region_and_show_input_mask_and_decoding(
  tmp_path, parti_run, trained_tokenizer
):
  Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "scene.png")
  lines = [
    {"prompt": "a red circle", "image": "scene.png", "box": [16, 0, 32, 16]},
    {"prompt": "two blue squares"},  # Not an edit: generated whole, in the same batch.
  ]
  requests = tmp_path / "edits.jsonl"
  requests.write_text("\n".join(json.dumps(x) for x in lines))
  out = tmp_path / "out"
  entries = run(out, parti_run, trained_tokenizer, requests)
  edit, plain = sorted(entries, key=lambda e: e["index"])
  assert "edit" not in plain and edit["edit"]["box"] == [16, 0, 32, 16]
  assert edit["edit"]["redrawn_tokens"] == 4 and edit["edit"]["kept_tokens"] == 12
  for key in ("input_file", "mask_file", "decoded_input_file"):
    assert (out / edit["edit"][key]).is_file()
  mask = np.asarray(Image.open(out / edit["edit"]["mask_file"]))
  assert (mask[:16, 16:] == 255).all() and (mask[16:] == 0).all()
  page = (out / infer.GALLERY).read_text()
  assert edit["edit"]["input_file"] in page and edit["edit"]["mask_file"] in page
  with pytest.raises(ConfigError, match=r"edits\.jsonl:1 is an edit; edits run with prefix_rows"):
    run(tmp_path / "o2", parti_run, trained_tokenizer, requests,
        options=dataclasses.replace(OPTIONS, prefix_rows=1))  # fmt: skip


def test_fine_tuned_edits_go_through_the_editing_head_and_a_model_without_one_is_refused(
  tmp_path, parti_run, trained_tokenizer
):
  Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "scene.png")
  lines = [
    {"prompt": "two blue squares"},
    {"prompt": "a red circle", "image": "scene.png", "box": [16, 0, 32, 16]},
  ]
  requests = tmp_path / "edits.jsonl"
  requests.write_text("\n".join(json.dumps(x) for x in lines))
  fine_tuned = dataclasses.replace(OPTIONS, edit_method="fine_tuned")
  refused = tmp_path / "refused"
  with pytest.raises(ConfigError, match=r"edits\.jsonl:2: a fine-tuned edit .* no editing head"):
    run(refused, parti_run, trained_tokenizer, requests, options=fine_tuned)
  assert not refused.exists()  # Refused before anything is written.
  edit_run = _save_run(tmp_path / "edit_model", tiny_run_config(edit_context=True))
  for method, made in (("auto", "fine_tuned"), ("zero_shot", "zero_shot")):
    out = tmp_path / method
    options = dataclasses.replace(OPTIONS, edit_method=method)
    plain, edit = sorted(run(out, edit_run, trained_tokenizer, requests, options=options),
                         key=lambda e: e["index"])  # fmt: skip
    assert json.loads((out / infer.OPTIONS_FILE).read_text())["edits_made"] == made
    assert "edit" not in plain and edit["edit"]["redrawn_tokens"] == 4
    assert (out / edit["files"][0]).is_file() and (out / plain["files"][0]).is_file()


def test_a_geneval_metadata_file_comes_out_in_geneval_folders_that_score(
  tmp_path, parti_run, trained_tokenizer
):
  from parti import evaluate_geneval
  from parti.evaluation import geneval
  from parti.tasks.shapes import scenes

  lines = [geneval.metadata_for_scene(scenes.make_scene(0, "test", i)) for i in range(3)]
  metadata = tmp_path / "evaluation_metadata.jsonl"
  metadata.write_text("".join(json.dumps(line) + "\n" for line in lines))
  out = tmp_path / "out"
  options = dataclasses.replace(OPTIONS, samples=2, keep=2)
  entries = run(out, parti_run, trained_tokenizer, metadata, options=options)
  assert len(entries) == 3
  found = read_geneval_folder(out / infer.GENEVAL_DIR)
  assert [(index, meta) for index, meta, _ in found] == [
    (i, lines[i]) for i in range(3) for _ in "ab"
  ]
  by_prompt = {e["prompt"]: e for e in entries}
  for _, meta, path in found:  # The kept images, best first.
    rank = int(pathlib.Path(path).stem)
    kept = out / by_prompt[meta["prompt"]]["files"][rank]
    assert pathlib.Path(path).read_bytes() == kept.read_bytes()
  summary = evaluate_geneval.evaluate_geneval(
    image_dir=str(out / infer.GENEVAL_DIR), output_dir=str(tmp_path / "scores")
  )
  assert summary["images"] == 6 and set(summary["tasks"]) <= set(geneval.TAGS)


def test_completion_refuses_a_tokenizer_that_stacks_its_groups():
  # A stacked layout's top token rows are one group's codes of the whole image, not the
  # image's top rows: completing them would keep the wrong thing.
  stacked = tiny_tokenizer_config(codebook_groups=2, group_layout="stacked")
  todo = [(0, Prompt("a red circle", image="given.png"))]
  options = dataclasses.replace(OPTIONS, prefix_rows=1)
  with pytest.raises(ConfigError, match="stacks its product codes group by group"):
    infer.prefix_tokens(todo, options, stacked, None, None)
