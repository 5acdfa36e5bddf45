"""The t5x-style model API and the KV-cached sampler behind predict_batch_with_aux."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import example_batch, forward, tiny_config

from parti.modeling.model import Parti
from parti.modeling.t5x_model import PartiT5xModel
from parti.sampling import decoding
from parti.training import optim
from parti.training.trainer import PartiTrainer

CONFIG = tiny_config(image_grid=(2, 3), cfg_dropout_rate=0.1)


@pytest.fixture(scope="module")
def model_and_params():
  model = PartiT5xModel(CONFIG)
  batch = example_batch(CONFIG, 4)
  shapes = {k: v.shape for k, v in batch.items()}
  variables = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(jax.random.key(0))
  return model, variables, batch


def test_initial_variables_carry_t5x_params_axes(model_and_params):
  _, variables, _ = model_and_params
  params, axes = variables["params"], variables["params_axes"]
  count = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [p.key for p in path]
    node = axes
    for key in keys[:-1]:
      node = node[key]
    names = node[f"{keys[-1]}_axes"].names
    assert len(names) == leaf.ndim, keys
    count += 1
  assert count > 10
  assert variables["params_axes"]["decoder"]["layers"]["mlp"]["wi"]["kernel_axes"].names == (
    "layers", "embed", "mlp",
  )  # fmt: skip


def test_loss_and_scores_agree_with_the_trainer(model_and_params):
  model, variables, batch = model_and_params
  params = variables["params"]
  loss, metrics = jax.jit(lambda p, b: model.loss_fn(p, b, None))(params, batch)
  trainer = PartiTrainer(CONFIG, optim.adafactor(optim.AdafactorConfig()), z_loss=1e-4)
  sums = trainer.eval_sums(params, batch)
  np.testing.assert_allclose(loss, sums["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"].compute(), sums["correct"] / 24, rtol=1e-5)
  scores = jax.jit(model.score_batch)(params, batch)
  assert scores.shape == (4,)
  np.testing.assert_allclose(-jnp.sum(scores), sums["nll"], rtol=1e-5)
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, jax.random.key(1))[0]))(params)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_greedy_decoding_is_the_argmax_of_the_full_forward(model_and_params):
  _, variables, batch = model_and_params
  params = variables["params"]
  text = batch["encoder_input_tokens"]
  tokens, log_probs = jax.jit(
    lambda p, t: decoding.sample(CONFIG, p, t, jax.random.key(0), temperature=0.0)
  )(params, text)
  assert tokens.shape == (4, CONFIG.image_length) and tokens.dtype == jnp.int32
  decoder_input = jnp.concatenate([jnp.full((4, 1), CONFIG.bos_id), tokens[:, :-1]], axis=1)
  logits = forward(CONFIG, params, text, decoder_input)
  np.testing.assert_array_equal(jnp.argmax(logits, -1), tokens)
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(log_probs, expected, atol=1e-5)


def test_guided_greedy_decoding_combines_conditional_and_null_logits(model_and_params):
  _, variables, batch = model_and_params
  params = variables["params"]
  text = batch["encoder_input_tokens"][:2]
  scale = 3.0
  tokens, _ = jax.jit(
    lambda p, t: decoding.sample(
      CONFIG, p, t, jax.random.key(0), temperature=0.0, guidance_scale=scale
    )
  )(params, text)
  decoder_input = jnp.concatenate([jnp.full((2, 1), CONFIG.bos_id), tokens[:, :-1]], axis=1)
  model = Parti(CONFIG)

  @jax.jit
  def logits_of(null):
    encoded, mask = model.apply({"params": params}, text, null=null, method=Parti.encode)
    return model.apply({"params": params}, decoder_input, encoded, mask, method=Parti.decode)

  cond, uncond = logits_of(jnp.zeros(2, bool)), logits_of(jnp.ones(2, bool))
  np.testing.assert_array_equal(jnp.argmax(uncond + scale * (cond - uncond), -1), tokens)


def test_predict_batch_with_aux_shapes_and_best_of_n(model_and_params):
  model, variables, batch = model_and_params
  params = variables["params"]
  predict = jax.jit(
    lambda p, b, rng: model.predict_batch_with_aux(
      p, b, rng, decoder_params={"top_k": 8}, num_decodes=3, return_all_decodes=True
    )
  )
  all_tokens, aux = predict(params, batch, jax.random.key(2))
  assert all_tokens.shape == (4, 3, CONFIG.image_length)
  assert aux["scores"].shape == (4, 3)
  assert int(all_tokens.max()) < CONFIG.image_vocab_size
  best, best_aux = jax.jit(
    lambda p, b, rng: model.predict_batch_with_aux(
      p, b, rng, decoder_params={"top_k": 8}, num_decodes=3
    )
  )(params, batch, jax.random.key(2))
  assert best.shape == (4, CONFIG.image_length)
  np.testing.assert_allclose(best_aux["scores"], aux["scores"].max(axis=1), rtol=1e-5)
  with pytest.raises(NotImplementedError):
    model.predict_batch_with_aux(params, batch, prompt_with_targets=True)


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  np.testing.assert_array_equal(
    jnp.isfinite(decoding.filter_logits(logits, top_k=2)), [[True, True, False, False]]
  )
  np.testing.assert_array_equal(
    jnp.isfinite(decoding.filter_logits(logits, top_p=0.7)), [[True, True, False, False]]
  )
  np.testing.assert_array_equal(
    jnp.isfinite(decoding.filter_logits(logits, top_p=0.9)), [[True, True, True, False]]
  )
  assert jnp.isfinite(decoding.filter_logits(logits)).all()


def test_params_are_float32_under_bfloat16(model_and_params):
  model = PartiT5xModel(CONFIG.replace(dtype="bfloat16"))
  shapes = {k: v.shape for k, v in model_and_params[2].items()}
  variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  assert {x.dtype for x in jax.tree_util.tree_leaves(nn.meta.unbox(variables["params"]))} == {
    jnp.dtype("float32")
  }


# --- t5x's calling conventions, reproduced without t5x ---------------------------------------


# A batch of 2 under threefry (or of 4 under rbg) once passed by accident: the key's
# shape matched a batch of keys.
@pytest.mark.parametrize(("impl", "batch_size"), [("threefry2x32", 2), ("unsafe_rbg", 3)])
def test_sampling_takes_t5xs_raw_uint32_keys(model_and_params, batch_size, impl):
  # t5x passes jax.random.PRNGKey's raw uint32 data: shape (2,) under threefry, (4,)
  # under the hardware RNG t5x.train switches to when no seed is given.
  model, variables, batch = model_and_params
  small = {k: v[:batch_size] for k, v in batch.items()}
  predict = jax.jit(
    lambda p, b, rng: model.predict_batch_with_aux(p, b, rng, decoder_params={"top_k": 4})
  )
  with jax.default_prng_impl(impl):
    raw = jax.random.PRNGKey(5)
    assert raw.dtype == jnp.uint32 and raw.ndim == 1
    tokens, _ = predict(variables["params"], small, raw)
    typed, _ = predict(variables["params"], small, jax.random.wrap_key_data(raw))
  assert tokens.shape == (batch_size, CONFIG.image_length)
  np.testing.assert_array_equal(tokens, typed)  # The same key, raw or typed.
  with pytest.raises(ValueError, match="raw uint32 key data"):
    decoding.example_keys(jnp.zeros((3,), jnp.float32), 3)
  with pytest.raises(ValueError, match="trailing shape"):
    decoding.example_keys(jnp.zeros((3,), jnp.uint32), 3)


def test_decoding_called_as_t5x_eval_and_infer_call_it(model_and_params):
  """t5x's utils.get_infer_fn, as t5x.infer and the inference evaluator use it.

  It passes `rng` only to infer steps with a parameter of that name, splits one raw
  PRNGKey per batch, and calls the step under jit with the key replicated.
  """
  import inspect

  model, variables, batch = model_and_params
  for step in (model.predict_batch, model.predict_batch_with_aux):
    assert "rng" in inspect.signature(step).parameters
  assert "rng" not in inspect.signature(model.score_batch).parameters
  with jax.default_prng_impl("unsafe_rbg"):  # t5x.train's RNG when no seed is set.
    rng = jax.random.PRNGKey(0)  # t5x's eval: rng=jax.random.PRNGKey(0)
    infer_step = jax.jit(lambda p, b, r: model.predict_batch_with_aux(p, b, r))
    outputs = []
    for _ in range(2):  # Two batches, each with its own step key, as t5x's loop.
      step_rng, rng = jax.random.split(rng)
      outputs.append(infer_step(variables["params"], batch, step_rng))
    scores = jax.jit(model.score_batch)(variables["params"], batch)
  (first, aux), (second, _) = outputs
  assert first.shape == (4, CONFIG.image_length) and aux["scores"].shape == (4,)
  assert not np.array_equal(first, second)  # Each batch draws with its own key.
  assert scores.shape == (4,) and np.isfinite(scores).all()


def test_all_decodes_come_sorted_best_last_as_in_t5x(model_and_params):
  model, variables, batch = model_and_params
  tokens, aux = jax.jit(
    lambda p, b: model.predict_batch_with_aux(
      p, b, jax.random.key(3), num_decodes=4, return_all_decodes=True
    )
  )(variables["params"], batch)
  scores = np.asarray(aux["scores"])
  assert (np.diff(scores, axis=1) >= 0).all()
  assert len(np.unique(scores)) > 4  # Real, different samples were sorted.
  # Each decode's score is its own log-likelihood (teacher-forced, unguided here).
  config = CONFIG
  flat = tokens.reshape(-1, config.image_length)
  text = jnp.repeat(batch["encoder_input_tokens"], 4, axis=0)
  decoder_input = jnp.concatenate([jnp.full((16, 1), config.bos_id), flat[:, :-1]], axis=1)
  logits = forward(config, variables["params"], text, decoder_input)
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), flat[..., None], -1).sum((1, 2))
  np.testing.assert_allclose(scores.reshape(-1), expected, rtol=1e-4, atol=1e-3)


def test_unknown_decoder_params_are_refused(model_and_params):
  model, variables, batch = model_and_params
  with pytest.raises(ValueError, match="Unknown decoder_params \\['beam_size'\\]"):
    model.predict_batch_with_aux(variables["params"], batch, decoder_params={"beam_size": 4})
  with pytest.raises(ValueError, match="num_decodes"):
    model.predict_batch_with_aux(variables["params"], batch, num_decodes=0)
  with pytest.raises(ValueError, match="Unknown decode_options"):
    PartiT5xModel(CONFIG, decode_options={"temprature": 1.0})


# The logical axis names t5x's Adafactor factors by (t5x.adafactor.
# standard_logical_factor_rules): it needs a rule for every parameter axis.
T5X_FACTOR_RULE_NAMES = {
  "vocab", "embed", "mlp", "heads", "kv", "joined_kv", "relpos_buckets", "layers", "stack",
  "q_wi_fused", "o_wo_fused", "multiquery_heads", "kv_fused", "layer_norm_scale",
  "mlp_activations",
}  # fmt: skip


def test_every_parameter_axis_has_a_t5x_adafactor_factor_rule(model_and_params):
  _, variables, _ = model_and_params
  names = set()
  for axes in jax.tree_util.tree_leaves(
    variables["params_axes"], is_leaf=lambda x: hasattr(x, "names")
  ):
    names.update(axes.names)
  # abspos_buckets is the one name t5x_model.adafactor_factor_rules adds.
  assert names <= T5X_FACTOR_RULE_NAMES | {"abspos_buckets"}, names


def test_weights_restored_in_bfloat16_score_and_evaluate(model_and_params):
  model, variables, batch = model_and_params
  half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), variables["params"])
  scores = jax.jit(model.score_batch)(half, batch)
  full = jax.jit(model.score_batch)(variables["params"], batch)
  np.testing.assert_allclose(scores, full, rtol=0.05)
  loss, _ = jax.jit(model.eval_fn)(half, batch)
  assert np.isfinite(float(loss))


def test_constructed_as_t5x_constructs_its_models():
  optimizer_def = object()  # t5x's OptimizerDef; the model only keeps it.
  model = PartiT5xModel(CONFIG, optimizer_def=optimizer_def, input_vocabulary="text vocab")
  assert model.optimizer_def is optimizer_def
  assert model.input_vocabulary == "text vocab"
  from parti.tasks import vocabularies

  assert model.output_vocabulary == vocabularies.ImageVocabulary(CONFIG.image_vocab_size)
  assert PartiT5xModel(CONFIG).input_vocabulary == vocabularies.text_vocabulary()
