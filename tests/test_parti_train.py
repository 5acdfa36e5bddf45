"""The Parti training job: outputs, exact resume, preemption, NaN, bad configs, raw images,
and two processes (hosts) training exactly like one."""

from __future__ import annotations

import functools
import os
import pathlib
import signal

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import as_gin, run_on_two_hosts, tiny_run_config
from PIL import Image

from parti import partitioning
from parti.modeling.config import PartiConfig
from parti.modeling.model import embeddings_from_codebook
from parti.runtime import gin_utils, metric_logging
from parti.runtime.errors import ConfigError, Preempted
from parti.tokenizer import checkpoint_io
from parti.training import checkpoints, optim
from parti.training import trainer as trainer_lib
from parti.training.samples import SampleConfig, tokenizer_checkpoint

pytestmark = pytest.mark.slow

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
TASK = "test_parti_tokens"


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> str:
  """A pre-encoded folder whose image tokens are a function of the caption."""
  from parti.tasks import token_records

  folder = tmp_path_factory.mktemp("tokens")
  token_records.write_provenance(
    folder, token_records.Provenance("synthetic", 64, (4, 4), 32, "test")
  )
  rng = np.random.default_rng(0)
  for split, count in (("train", 64), ("validation", 16)):
    records = []
    for i in range(count):
      color, shape = rng.integers(0, 4, 2)
      tokens = (16 * color + 4 * shape + np.arange(16)) % 64
      records.append(
        token_records.serialize(f"{split}{i}", f"a {COLORS[color]} {SHAPES[shape]}", tokens)
      )
    token_records.write_shard(folder / token_records.shard_name(split, 0, 0), records)
  return str(folder)


def run(model_dir, tokens_dir, **overrides):
  from parti import train

  args = dict(
    model_dir=str(model_dir),
    model=tiny_run_config(),
    mixture_or_task_name=TASK,
    task_feature_lengths={"inputs": 16, "targets": 16},
    batch_size=8,
    num_steps=8,
    optimizer=optim.AdafactorConfig(
      learning_rate=1e-2, warmup_steps=1, decay_start=4, decay_end=8, final_ratio=0.5
    ),
    mesh=partitioning.MeshConfig(data=4, model=2, rules="model_parallel"),
    pre_encoded_dir=tokens_dir,
    eval_every=4,
    eval_batches=2,
    log_every=1,
    checkpoint_every=4,
    peak_flops=1e11,
  )
  args.update(overrides)
  return train.train(**args)


def losses(model_dir) -> dict[int, float]:
  return {
    step: row["train/loss"]
    for step, row in metric_logging.read_metrics(model_dir).items()
    if "train/loss" in row
  }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokens_dir) -> pathlib.Path:
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  run(model_dir, tokens_dir)
  return model_dir


def test_training_writes_metrics_checkpoints_and_configs(uninterrupted):
  rows = metric_logging.read_metrics(uninterrupted)
  for key in ("train/loss", "train/accuracy", "train/learning_rate", "train/grad_norm"):
    assert key in rows[8], key
  assert rows[8]["perf/tokens_per_second"] > 0 and 0 < rows[8]["perf/mfu"] < 1
  assert rows[8]["eval/loss"] < rows[4]["eval/loss"]  # It learns the caption -> tokens map.
  # ... and the text-use metric sees it: the caption lowers the held-out NLL. (Eight toy
  # steps are too few for the gap to grow monotonically; its exact value is checked
  # against an explicit null-condition forward in the test below.)
  for step in (4, 8):
    gap = rows[step]["eval/nll_null"] - rows[step]["eval/nll"]
    assert rows[step]["eval/text_gap"] == pytest.approx(gap, abs=1e-5)
    assert rows[step]["eval/text_gap"] > 0
    assert "eval/object_text_gap" in rows[step]
  assert rows[8]["train/loss"] < rows[1]["train/loss"]
  assert (uninterrupted / "parti_config.json").exists()
  assert PartiConfig.load(uninterrupted / "parti_config.json") == tiny_run_config()
  assert (uninterrupted / gin_utils.OPERATIVE_CONFIG).exists()
  assert sorted(
    int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()
  ) == [4, 8]
  assert [p.name for p in (uninterrupted / "best").iterdir() if p.name.isdigit()] == ["8"]


def test_preempted_and_resumed_run_matches_the_uninterrupted_one(
  tmp_path, tokens_dir, uninterrupted, monkeypatch
):
  from parti.tasks import input_pipeline

  original_next = input_pipeline.ResumableIterator.__next__
  served = {"batches": 0}

  def next_then_preempt(self):
    served["batches"] += 1
    if served["batches"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # A preemption notice during step 3.
    return original_next(self)

  monkeypatch.setattr(input_pipeline.ResumableIterator, "__next__", next_then_preempt)
  with pytest.raises(Preempted, match="at step 3"):
    run(tmp_path, tokens_dir)
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [3], "SIGTERM saves the step it interrupted, then exits"
  monkeypatch.setattr(input_pipeline.ResumableIterator, "__next__", original_next)

  run(tmp_path, tokens_dir)
  expected, resumed = losses(uninterrupted), losses(tmp_path)
  assert sorted(resumed) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


def test_corrupt_latest_checkpoint_falls_back_and_nan_keeps_the_last_good(
  tmp_path, tokens_dir, uninterrupted, caplog
):
  import shutil

  shutil.copytree(uninterrupted, tmp_path / "run")
  model_dir = tmp_path / "run"
  for path in (model_dir / "checkpoints" / "8").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "params" in str(path):
      path.write_bytes(b"corrupt")
  run(model_dir, tokens_dir, num_steps=8)
  assert "cannot be restored" in caplog.text
  assert losses(model_dir)[8] == pytest.approx(losses(uninterrupted)[8], rel=1e-6)

  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    run(model_dir, tokens_dir, num_steps=10, z_loss=float("nan"))
  saved = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert max(saved) == 8


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"mesh": partitioning.MeshConfig(data=3)}, "devices"),
    ({"batch_size": 6}, "does not divide"),
    ({"microbatches": 3}, "microbatches"),
    ({"task_feature_lengths": {"inputs": 16, "image": 32}}, "must have keys"),
    ({"task_feature_lengths": {"inputs": 16, "targets": 9}}, "differs from the model"),
    ({"mixture_or_task_name": "no_such_task", "pre_encoded_dir": None}, "Unknown seqio task"),
    ({"model": tiny_run_config(text_vocab_size=50)}, "text vocabulary"),
    ({"init_from": "/nonexistent/run"}, "init_from"),
    ({"image_embeddings_from_codebook": True}, "needs the run's tokenizer"),
  ],
  ids=[
    "mesh", "batch", "microbatches", "feature_keys", "targets_length", "task",
    "text_vocab", "init_from", "codebook_without_tokenizer",
  ],
)  # fmt: skip
def test_bad_configs_fail_at_start_up(tmp_path, tokens_dir, overrides, message):
  with pytest.raises(ConfigError, match=message):
    run(tmp_path, tokens_dir, num_steps=1, **overrides)


def test_unknown_gin_binding_is_a_clear_error():
  import parti.train  # noqa: F401

  gin.clear_config()
  try:
    with pytest.raises(gin_utils.GinConfigError, match="no_such_argument"):
      gin_utils.parse(["gin/runs/pretrain_tiny_shapes.gin"], ["train.no_such_argument = 1"])
  finally:
    gin.clear_config()


def test_sample_images_find_the_tokenizer_that_encoded_the_data(tmp_path, tokens_dir, caplog):
  from parti.tasks import token_records

  assert tokenizer_checkpoint("/my/tokenizer", tokens_dir) == ("/my/tokenizer", None)
  assert tokenizer_checkpoint(None, None) is None
  # tokens_dir was made by no real tokenizer: no samples, and the log says why.
  assert tokenizer_checkpoint(None, tokens_dir) is None
  assert "No sample images" in caplog.text
  (tmp_path / "tokenizer").mkdir()
  token_records.write_provenance(
    tmp_path, token_records.Provenance(f"{tmp_path / 'tokenizer'}@300", 64, (4, 4), 32, "test")
  )
  assert tokenizer_checkpoint(None, str(tmp_path)) == (str(tmp_path / "tokenizer"), 300)


def test_raw_images_are_tokenized_in_the_step(tmp_path, trained_tokenizer, shapes_task_name):
  model = tiny_run_config(text_length=32)
  result = run(
    tmp_path,
    None,
    model=model,
    mixture_or_task_name=shapes_task_name,
    task_feature_lengths={"inputs": 32, "image": 32},
    tokenizer_dir=str(trained_tokenizer),
    pre_encoded_dir=None,
    num_steps=2,
    eval_split=None,
    mesh=partitioning.MeshConfig(data=8),
    samples=SampleConfig(every=2, count=3, guidance_scale=2.0),
  )
  assert np.isfinite(result["train/loss"])
  # Samples of the training prompts, decoded by the run's tokenizer, with their captions.
  sheet = Image.open(tmp_path / "images" / "samples_0000002.png")
  assert sheet.size == (4 * 128, 128 + 44)  # One row of 3 (of 4 columns): image and caption.
  assert np.asarray(sheet)[:128, : 3 * 128].std() > 0
  # A run may start its image-token embeddings from that tokenizer's codebook. Its one
  # step is the first run's program (loaded from the compilation cache), and at step 0
  # the warm-up's learning rate is 0: the checkpoint holds the initial embeddings.
  run(
    tmp_path / "codebook", None, model=model, mixture_or_task_name=shapes_task_name,
    task_feature_lengths={"inputs": 32, "image": 32}, tokenizer_dir=str(trained_tokenizer),
    pre_encoded_dir=None, num_steps=1, eval_split=None, checkpoint_every=1,
    mesh=partitioning.MeshConfig(data=8), image_embeddings_from_codebook=True,
  )  # fmt: skip
  _, tokenizer_params, _ = checkpoint_io.load_params(trained_tokenizer)
  expected = embeddings_from_codebook(tokenizer_params["quantizer"]["codebook"], model.embed_dim)
  params = checkpoints.restore_params(tmp_path / "codebook", None)[1]
  table = np.asarray(params["decoder"]["token_embedding"]["embedding"])
  np.testing.assert_allclose(table[: model.image_vocab_size], expected, atol=1e-6)
  with pytest.raises(ConfigError, match="tokenizer_dir"):
    run(
      tmp_path / "no_tokenizer", None, model=model, mixture_or_task_name=shapes_task_name,
      task_feature_lengths={"inputs": 32, "image": 32}, pre_encoded_dir=None, num_steps=1,
    )  # fmt: skip
  with pytest.raises(ConfigError, match="codes"):
    run(
      tmp_path / "mismatch", None, model=tiny_run_config(text_length=32, image_vocab_size=128),
      mixture_or_task_name=shapes_task_name, task_feature_lengths={"inputs": 32, "image": 32},
      tokenizer_dir=str(trained_tokenizer), pre_encoded_dir=None, num_steps=1,
    )  # fmt: skip


# --- Multi-host ---------------------------------------------------------------------------------


def test_two_processes_of_four_devices_train_like_one_of_eight(tmp_path, tokens_dir):
  # Unshuffled and without guidance dropout (which depends on an example's place in
  # the global batch), two hosts see the same global batches as one: each reads
  # every other example of the one file, and losses are means over the batch.
  same = dict(
    model=tiny_run_config(cfg_dropout_rate=0.0), shuffle=False, num_steps=4, eval_every=4,
    checkpoint_every=4,
  )  # fmt: skip
  run(tmp_path / "one", tokens_dir, **same)

  args = dict(
    model_dir=str(tmp_path / "two"),
    mixture_or_task_name=TASK,
    pre_encoded_dir=tokens_dir,
    task_feature_lengths={"inputs": 16, "targets": 16},
    batch_size=8,
    optimizer=optim.AdafactorConfig(
      learning_rate=1e-2, warmup_steps=1, decay_start=4, decay_end=8, final_ratio=0.5
    ),
    mesh=partitioning.MeshConfig(data=4, model=2, rules="model_parallel"),
    eval_batches=2,
    log_every=1,
    peak_flops=1e11,
    **same,
  )
  (tmp_path / "two.gin").write_text(as_gin("train", args))
  outputs = run_on_two_hosts(["-m", "parti.train", f"--gin_file={tmp_path / 'two.gin'}"], tmp_path)
  assert "Process 1 of 2: 4 local and 8 global devices" in outputs[1]

  one = metric_logging.read_metrics(tmp_path / "one")
  two = metric_logging.read_metrics(tmp_path / "two")
  for step in range(1, 5):
    assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
  assert two[4]["eval/loss"] == pytest.approx(one[4]["eval/loss"], rel=1e-5)
  # Both hosts wrote the checkpoint together, with each host's input position.
  saved = tmp_path / "two" / "checkpoints"
  assert (saved / "4").is_dir()
  hosts_saved = {p.name.split(".")[0] for p in (saved / "input_state" / "4").iterdir()}
  assert hosts_saved == {"input_state_00000", "input_state_00001"}


def test_object_tokens_are_those_off_their_images_most_frequent_code():
  targets = jnp.array([[5, 5, 5, 2, 5, 7], [1, 1, 3, 1, 3, 1]])
  weights = trainer_lib.object_token_weights(targets, vocab_size=8)
  np.testing.assert_array_equal(weights, [[0, 0, 0, 1, 0, 1], [0, 0, 1, 0, 1, 0]])


def test_object_patches_with_two_tokens_each():
  # Two groups of 4 codes (0-3, 4-7); a patch is (group-0 code, group-1 code). The
  # background patch is (1, 6); a patch differing in either token is an object's,
  # and both its tokens count.
  targets = jnp.array([[1, 6, 1, 6, 2, 6, 1, 5, 1, 6]])
  weights = trainer_lib.object_token_weights(targets, vocab_size=8, tokens_per_patch=2)
  np.testing.assert_array_equal(weights, [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0]])


def test_eval_sums_score_the_same_targets_with_and_without_the_text():
  config = tiny_run_config(cfg_dropout_rate=0.1)
  trainer = trainer_lib.PartiTrainer(config, optax.sgd(0.1))
  params = nn.meta.unbox(jax.jit(trainer.init_params)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(2, 128, (4, 16)), jnp.int32)
  targets = jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32)
  targets = targets.at[:, :10].set(7)  # Code 7 is every image's background.
  batch = {
    "encoder_input_tokens": text,
    "decoder_input_tokens": jnp.concatenate([jnp.full((4, 1), 64), targets[:, :-1]], 1),
    "decoder_target_tokens": targets,
    "decoder_loss_weights": jnp.ones_like(targets),
  }
  sums = jax.jit(trainer.eval_sums)(params, batch)

  @functools.cache
  def per_token_nll(null: bool) -> jax.Array:
    def forward(m):
      encoded, enc_mask = m.encode(text, null=jnp.full((4,), null))
      return m.decode(batch["decoder_input_tokens"], encoded, enc_mask)

    logits = jax.jit(lambda p: trainer.model.apply({"params": p}, method=forward))(params)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]

  def nll(null, mask):
    return float(jnp.sum(per_token_nll(null) * mask))

  objects = np.asarray(targets != 7, np.float32)
  assert float(sums["nll"]) == pytest.approx(nll(False, 1.0), rel=1e-5)
  assert float(sums["nll_null"]) == pytest.approx(nll(True, 1.0), rel=1e-5)
  assert float(sums["object_nll"]) == pytest.approx(nll(False, objects), rel=1e-5)
  assert float(sums["object_nll_null"]) == pytest.approx(nll(True, objects), rel=1e-5)
  assert float(sums["object_weight_sum"]) == objects.sum()
  # The null condition really replaces the text: the two scores differ.
  assert abs(float(sums["nll_null"]) - float(sums["nll"])) > 1e-4
  means = trainer_lib.summarize(sums)
  # A small difference of two sums, each good to the rel=1e-5 above: its own relative
  # error is larger (1.3e-4 on one machine), so it is held to the sums' absolute error.
  assert float(means["object_text_gap"]) == pytest.approx(
    (nll(True, objects) - nll(False, objects)) / objects.sum(),
    abs=1e-5 * nll(True, objects) / objects.sum(),
  )


def test_adam_trains_small_runs_on_its_own_schedule(tmp_path, tokens_dir):
  adam = optim.AdamConfig(
    learning_rate=1e-2, final_learning_rate=1e-3, warmup_steps=2, weight_decay=0.0
  )
  run(tmp_path, tokens_dir, optimizer=adam)
  rows = metric_logging.read_metrics(tmp_path)
  schedule = optim.warmup_cosine(adam, 8)
  for step in (1, 2, 5, 8):
    assert rows[step]["train/learning_rate"] == pytest.approx(float(schedule(step - 1)))
  assert rows[8]["eval/loss"] < rows[4]["eval/loss"]
  with pytest.raises(ConfigError, match="warmup_steps"):
    run(tmp_path / "bad", tokens_dir, optimizer=optim.AdamConfig(warmup_steps=8))


def test_rerunning_a_run_with_another_model_config_is_refused_and_touches_nothing(
  tmp_path, tokens_dir, uninterrupted
):
  import shutil

  shutil.copytree(uninterrupted, tmp_path / "run")
  model_dir = tmp_path / "run"
  listing = {p: p.stat().st_mtime_ns for p in model_dir.rglob("*")}
  with pytest.raises(ConfigError, match=r"another config \(embed_dim: 32 there, 64 here\)"):
    run(model_dir, tokens_dir, num_steps=12, model=tiny_run_config(embed_dim=64))
  assert {p: p.stat().st_mtime_ns for p in model_dir.rglob("*")} == listing


def test_fine_tuning_for_editing_adds_the_head_and_trains_on_redrawn_tokens(
  tmp_path, tokens_dir, uninterrupted
):
  from parti.training.edit_masks import EditMaskConfig

  edit_model = tiny_run_config(edit_context=True)
  fine_tune = functools.partial(
    run, tmp_path, tokens_dir, model=edit_model, init_from=str(uninterrupted),
    edit_masks=EditMaskConfig(), eval_split=None,
  )  # fmt: skip
  fine_tune(num_steps=4)
  assert PartiConfig.load(tmp_path / "parti_config.json") == edit_model
  rows = metric_logging.read_metrics(tmp_path)
  # Loss on the redrawn tokens only: fewer than the batch's 8 x 16, never none.
  assert all(0 < rows[s]["train/tokens"] < 8 * 16 for s in range(1, 5))
  assert all(np.isfinite(rows[s]["train/loss"]) for s in range(1, 5))
  # Resumable: a rerun continues from its own step 4 (init_from is then ignored).
  fine_tune(num_steps=6)
  assert sorted(losses(tmp_path)) == list(range(1, 7))
  # The head cannot be dropped by fine-tuning a model without one from this run.
  with pytest.raises(ConfigError, match="has the editing head"):
    run(tmp_path / "back", tokens_dir, num_steps=1, init_from=str(tmp_path))
  with pytest.raises(ConfigError, match="edit_masks trains the editing head"):
    run(tmp_path / "headless", tokens_dir, num_steps=1, edit_masks=EditMaskConfig())


@pytest.mark.parametrize(
  ("groups", "tokens_per_patch", "ok"),
  [(1, 1, True), (2, 1, True), (2, 2, True), (1, 2, False), (4, 2, False)],
)
def test_tokens_per_patch_must_be_one_or_the_tokenizers_groups(groups, tokens_per_patch, ok):
  config = tiny_run_config(image_grid=(2, 4), tokens_per_patch=tokens_per_patch)
  if ok:
    checkpoint_io.check_token_layout(config, groups, "runs/tokens")
  else:
    with pytest.raises(
      ConfigError, match=f"runs/tokens has {groups} token.*tokens_per_patch is {tokens_per_patch}"
    ):
      checkpoint_io.check_token_layout(config, groups, "runs/tokens")


def test_stacked_groups_are_drawn_in_turn_and_fine_tuned_for_editing_as_stacked_grids():
  # Each group's grid in turn: a patch's tokens are image_length / 2 apart, so they cannot
  # be drawn apart (tokens_per_patch 2), and editing's regions must know the grids.
  in_turn, apart = (tiny_run_config(image_grid=(4, 2), tokens_per_patch=n) for n in (1, 2))
  checkpoint_io.check_token_layout(in_turn, 2, "runs/tokens", "stacked")
  with pytest.raises(ConfigError, match=r"'stacked'.*set tokens_per_patch to 1"):
    checkpoint_io.check_token_layout(apart, 2, "runs/tokens", "stacked")
  with pytest.raises(ConfigError, match=r"'stacked'.*stacked_groups is 1: set it to 2"):
    checkpoint_io.check_token_layout(in_turn, 2, "runs/tokens", "stacked", editing=True)
  editable = tiny_run_config(image_grid=(4, 2), stacked_groups=2)
  checkpoint_io.check_token_layout(editable, 2, "runs/tokens", "stacked", editing=True)
  checkpoint_io.check_token_layout(apart, 2, "runs/tokens", "interleaved", editing=True)
  with pytest.raises(ConfigError, match="stacked_groups is 2, but runs/tokens does not stack"):
    checkpoint_io.check_token_layout(editable, 2, "runs/tokens", "interleaved")
  with pytest.raises(ConfigError, match="stacked_groups 2 must divide the image grid's 3 rows"):
    tiny_run_config(image_grid=(3, 2), stacked_groups=2)
