"""lm-evaluation-harness adapter: any lm-eval task (from local files) against a checkpoint.

    import lm_eval
    from train.lm_eval_adapter import ZooLM
    lm_eval.simple_evaluate(model=ZooLM("runs/x"), tasks=["my_task"],
                            task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"))

Scores are log-probabilities under the model: loglikelihood(context, continuation) sums log p of
the continuation's tokens given everything before them; loglikelihood_rolling(text) sums log p of
tokens 1..n−1 (a byte model has no BOS token to predict token 0 from — exactly the tokens the
trainer's loss averages); generate_until samples greedily with the layers' caches and cuts at
the first stop string. Sequences are right-padded to a multiple of 64 tokens (few compilations);
padding is masked with segment_ids, so it changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM

from train.restore import restore_run
from zoo.generate import generate

__all__ = ["ZooLM"]

_BUCKET = 64


class ZooLM(LM):
    def __init__(self, workdir: str, step: int | None = None, batch_size: int = 8):
        super().__init__()
        self.run = restore_run(workdir, step)
        self.tok = self.run.tokenizer
        self.batch_size = int(batch_size)
        ts = self.run.ts

        @jax.jit
        def token_logprobs(params, tokens, segment_ids):
            logits, _ = ts.model(params)(tokens, segment_ids=segment_ids)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # predicts tokens[:, 1:]
            picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            greedy = jnp.argmax(logp, axis=-1) == tokens[:, 1:]
            return picked, greedy

        self._token_logprobs = token_logprobs

    def _score(self, sequences: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each token list: (log p(token_i | tokens_<i), is_argmax) for i = 1..n−1."""
        out = []
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i:i + self.batch_size]
            t = -(-max(len(s) for s in chunk) // _BUCKET) * _BUCKET
            tokens = np.zeros((self.batch_size, t), np.int32)
            seg = np.zeros((self.batch_size, t), np.int32)
            for j, s in enumerate(chunk):
                tokens[j, :len(s)], seg[j, :len(s)] = s, 1
            logp, greedy = self._token_logprobs(self.run.params, jnp.asarray(tokens), jnp.asarray(seg))
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            out += [(logp[j, :len(s) - 1], greedy[j, :len(s) - 1]) for j, s in enumerate(chunk)]
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        seqs, n_cont = [], []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self.tok.encode(context), self.tok.encode(continuation)
            if len(ctx) == 0:  # no BOS: the continuation's first token is the context
                ctx, cont = cont[:1], cont[1:]
            seqs.append(np.concatenate([ctx, cont]).astype(np.int32))
            n_cont.append(len(cont))
        results = []
        for (logp, greedy), n in zip(self._score(seqs), n_cont):
            results.append((float(logp[len(logp) - n:].sum()), bool(greedy[len(greedy) - n:].all())))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        seqs = [self.tok.encode(req.args[0]).astype(np.int32) for req in requests]
        return [float(logp.sum()) for logp, _ in self._score(seqs)]

    def generate_until(self, requests) -> list[str]:
        model = self.run.model()
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until", []) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            ids = self.tok.encode(context).tolist() or [0]
            cont = self.tok.decode(generate(model, [ids], max_new, greedy=True)[0])
            cuts = [cont.index(u) for u in until if u and u in cont]
            out.append(cont[:min(cuts)] if cuts else cont)
        return out
