"""The character corpus (l2o.tasks.text) and character-level LM tasks (l2o.tasks.language)."""

import socket

import pytest
import torch
from torch.func import grad, vmap

from l2o.tasks import get_task, task_names
from l2o.tasks.language import CharLSTMTask, CharTransformerTask
from l2o.tasks.text import VOCAB, VOCAB_SIZE, CharCorpus, _load_ids, decode, encode


def small_lstm(**kw):
    return CharLSTMTask(**{"embed_dim": 4, "hidden_size": 6, "seq_len": 8, "batch_size": 3, **kw})


def small_transformer(**kw):
    defaults = {"d_model": 8, "n_heads": 2, "n_layers": 2, "seq_len": 8, "batch_size": 3}
    return CharTransformerTask(**{**defaults, **kw})


LM_TASKS = [small_lstm, small_transformer]


# --------------------------------------------------------------------------------------- corpus


def test_vocabulary_is_newline_plus_printable_ascii():
    assert VOCAB_SIZE == 96 == len(VOCAB) == len(set(VOCAB))
    assert VOCAB[0] == "\n" and VOCAB[1:] == "".join(chr(c) for c in range(32, 127))


def test_encode_drops_unknown_characters_and_decode_inverts_it():
    ids = encode("a\tb\r\né~")
    assert ids.dtype == torch.uint8
    assert decode(ids) == "a b\n~"


def test_corpus_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    _load_ids.cache_clear()
    corpus = CharCorpus()
    assert len(corpus) > 100_000
    assert int(corpus.split("train").max()) < VOCAB_SIZE


def test_corpus_splits_by_position():
    corpus = CharCorpus(eval_fraction=0.1)
    train, held_out = corpus.split("train"), corpus.split("eval")
    whole = _load_ids(corpus.modules)
    assert torch.equal(torch.cat([train, held_out]), whole)
    assert abs(len(held_out) / len(whole) - 0.1) < 1e-3


def test_windows_are_deterministic_and_next_character_targets():
    corpus = CharCorpus()
    x, y = corpus.windows(seed=3, step=5, split="train", batch_size=4, seq_len=16)
    x2, y2 = corpus.windows(seed=3, step=5, split="train", batch_size=4, seq_len=16)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    for other in [(4, 5), (3, 6)]:
        assert not torch.equal(x, corpus.windows(*other, "train", 4, 16)[0])


def test_eval_windows_come_from_the_eval_split():
    corpus = CharCorpus()
    x, _ = corpus.windows(seed=0, step=0, split="eval", batch_size=8, seq_len=32)
    held_out = decode(corpus.split("eval"))
    for row in x:
        assert decode(row) in held_out


def test_corpus_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eval_fraction"):
        CharCorpus(eval_fraction=1.5)
    with pytest.raises(ValueError, match="modules"):
        CharCorpus(modules=[])
    with pytest.raises(FileNotFoundError, match="sys"):
        CharCorpus(modules=["sys"])  # built in: no source file
    with pytest.raises(ValueError, match="split"):
        CharCorpus().split("test")


# --------------------------------------------------------------------------------------- tasks


def test_lm_tasks_are_registered_and_rebuild_from_config():
    assert {"char_lstm", "char_transformer"} <= set(task_names())
    for make in LM_TASKS:
        task = make()
        rebuilt = get_task(**task.config())
        assert type(rebuilt) is type(task) and rebuilt.config() == task.config()


@pytest.mark.parametrize("make", LM_TASKS)
def test_same_seed_same_params_and_batches_different_seed_differs(make):
    task = make()
    a, b, c = task.init_from_seed(0), task.init_from_seed(0), task.init_from_seed(1)
    assert a.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)
    assert all(torch.equal(u, v) for u, v in zip(task.batch(0, 2), task.batch(0, 2)))
    assert not torch.equal(task.batch(0, 2)[0], task.batch(1, 2)[0])
    assert not torch.equal(task.batch(0, 2)[0], task.batch(0, 3)[0])


@pytest.mark.parametrize("make", LM_TASKS)
def test_initial_loss_is_near_uniform_prediction(make):
    task = make()
    loss = task.loss(task.init_from_seed(0), task.batch(0, 0))
    assert loss.shape == () and torch.isfinite(loss)
    assert abs(float(loss) - torch.log(torch.tensor(96.0)).item()) < 1.0


@pytest.mark.parametrize("make", LM_TASKS)
def test_vmapped_population_matches_python_loop(make):
    task = make()
    seeds = [0, 1, 2]
    params, batch = task.population_init(seeds), task.population_batch(seeds, step=4)
    losses = vmap(task.loss)(params, batch)
    grads = vmap(grad(task.loss))(params, batch)
    for i, seed in enumerate(seeds):
        p, b = task.init_from_seed(seed), task.batch(seed, 4)
        torch.testing.assert_close(losses[i], task.loss(p, b))
        g = grad(task.loss)(p, b)
        for k in g:
            torch.testing.assert_close(grads[k][i], g[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", LM_TASKS)
def test_gradient_matches_finite_differences_in_float64(make):
    task = make(seq_len=5, batch_size=2)
    task.dtype = torch.float64
    params, batch = task.init_from_seed(0), task.batch(0, 0)
    assert all(v.dtype == torch.float64 for v in params.values())
    analytic = grad(task.loss)(params, batch)
    generator = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name in sorted(params)[:: max(1, len(params) // 4)]:
        for _ in range(2):
            i = int(torch.randint(params[name].numel(), (1,), generator=generator))
            shifted = {}
            for sign in (1, -1):
                p = {k: v.clone() for k, v in params.items()}
                p[name].view(-1)[i] += sign * eps
                shifted[sign] = task.loss(p, batch)
            numeric = (shifted[1] - shifted[-1]) / (2 * eps)
            torch.testing.assert_close(analytic[name].view(-1)[i], numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("make", LM_TASKS)
def test_adam_decreases_the_loss_in_a_few_steps(make):
    task = make()
    params = {k: v.requires_grad_() for k, v in task.init_from_seed(0).items()}
    batch = task.batch(0, 0)
    adam = torch.optim.Adam(params.values(), lr=1e-2)
    with torch.no_grad():
        first = float(task.loss(params, batch))
    for _ in range(20):
        adam.zero_grad()
        task.loss(params, batch).backward()
        adam.step()
    with torch.no_grad():
        assert float(task.loss(params, batch)) < first - 0.3


def test_second_order_gradients_flow_through_the_lstm():
    task = small_lstm()
    params, batch = task.init_from_seed(0), task.batch(0, 0)
    lr = torch.tensor(0.1, requires_grad=True)
    g = grad(task.loss)(params, batch)
    after = task.loss({k: params[k] - lr * g[k] for k in params}, batch)
    (dlr,) = torch.autograd.grad(after, lr)
    assert torch.isfinite(dlr) and dlr < 0  # a larger step lowers the loss at first


def test_lm_tasks_reject_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        CharLSTMTask(hidden_size=0)
    with pytest.raises(ValueError, match="n_heads"):
        CharTransformerTask(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="seq_len"):
        CharTransformerTask(seq_len=0)
