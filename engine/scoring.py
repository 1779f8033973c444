"""Scoring text pairs with an encoder: the inputs a score/rerank request sends, and its scores.

Two kinds of model score, as in vLLM and sentence-transformers:
- a cross-encoder (a classifier with one label) reads each pair joined into one input
  ([CLS] a [SEP] b [SEP]); its logit, through the model's activation (sigmoid unless the
  folder says identity), is the score;
- an embedding model (a bi-encoder) embeds every text once; a pair's score is the cosine
  similarity of the two vectors.
Pairs follow vLLM's rule: one first text against each second text, or the i-th against the i-th.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.embedding_engine import EmbeddingRequest, truncate_ids
from engine.errors import InvalidRequestError, PromptTooLongError


@dataclass(frozen=True)
class ScoreJob:
    """One score request as the engine runs it, and how its output rows become scores."""

    payload: EmbeddingRequest
    pairs: list[tuple[int, int]]  # (index into the first texts, index into the second) per score
    cross: bool  # rows are one logit per pair; else embeddings of the first texts, then the second
    num_first: int  # how many first texts there are

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.payload.inputs))


def pair_indices(n_first: int, n_second: int, param: str) -> list[tuple[int, int]]:
    if n_first == 1:
        return [(0, j) for j in range(n_second)]
    if n_first == n_second:
        return [(i, i) for i in range(n_first)]
    raise InvalidRequestError(
        f"give one first text, or as many first texts as second texts; got {n_first} and {n_second}", param
    )


def score_job(engine: Any, first: list[str], second: list[str], truncate: bool = False,
              param: str = "text_2", direction: str = "right") -> ScoreJob:
    """Tokenize a score request for `engine` (an EmbeddingEngine). Over-long inputs are a 400
    naming `param` unless `truncate`, which cuts a pair's longer text first (HF's longest_first)
    or a single text's end."""
    pairs = pair_indices(len(first), len(second), param)
    tokenizer, limit = _tokenizer(engine, "scoring"), engine.max_model_len
    if engine.is_classifier:
        labels = len(engine.info.labels)
        if labels != 1:
            raise InvalidRequestError(
                f"model {engine.info.name!r} is a classifier with {labels} labels; scoring needs a cross-encoder "
                "(one label) or an embedding model", "model")
        encoded = tokenizer.encode_pairs([(first[i], second[j]) for i, j in pairs],
                                         max_length=limit if truncate else None, direction=direction)
        inputs, types = [ids for ids, _ in encoded], [t for _, t in encoded]
    else:
        if truncate and direction != "right":  # pairs are cut by the tokenizer; single texts only at their end
            raise InvalidRequestError("an embedding model's inputs are cut at their end: truncation_direction "
                                      "must be right", "truncation_direction")
        inputs = tokenizer.encode_batch(first + second)
        if truncate:
            inputs = [truncate_ids(ids, limit, engine.suffix) for ids in inputs]
        types = None
    _check_lengths(inputs, limit, param)
    payload = EmbeddingRequest(inputs=inputs, token_type_ids=types)
    return ScoreJob(payload=payload, pairs=pairs, cross=engine.is_classifier, num_first=len(first))


def classify_request(engine: Any, items: list[str | tuple[str, str]], truncate: bool = False,
                     param: str = "input") -> EmbeddingRequest:
    """Texts and text pairs for a classifier, one input each: a pair joined by the tokenizer's pair
    template (cut longest-first under `truncate`), a text cut at its end."""
    tokenizer, limit = _tokenizer(engine, "classification"), engine.max_model_len
    pairs = [i for i, item in enumerate(items) if not isinstance(item, str)]
    singles = [i for i, item in enumerate(items) if isinstance(item, str)]
    encoded = dict(zip(pairs, tokenizer.encode_pairs([tuple(items[i]) for i in pairs],
                                                     max_length=limit if truncate else None)))
    for i, ids in zip(singles, tokenizer.encode_batch([items[i] for i in singles])):
        ids = truncate_ids(ids, limit, engine.suffix) if truncate else ids
        encoded[i] = (ids, [0] * len(ids))
    inputs, types = [encoded[i][0] for i in range(len(items))], [encoded[i][1] for i in range(len(items))]
    _check_lengths(inputs, limit, param)
    return EmbeddingRequest(inputs=inputs, token_type_ids=types if pairs else None)


def _tokenizer(engine: Any, what: str) -> Any:
    if engine.tokenizer is None:
        raise InvalidRequestError(f"model {engine.info.name!r} has no tokenizer; {what} takes text", "model")
    return engine.tokenizer


def _check_lengths(inputs: list[list[int]], limit: int, param: str) -> None:
    for i, ids in enumerate(inputs):
        if len(ids) > limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens. However, input {i} has {len(ids)} "
                "tokens. Shorten it or pass truncate.", param)


def activate(logits: torch.Tensor, activation: str | None) -> torch.Tensor:
    return torch.sigmoid(logits) if activation == "sigmoid" else logits


def read_scores(job: ScoreJob, rows: list[torch.Tensor], activation: str | None, raw: bool = False) -> list[float]:
    """One float per pair, in pair order; `raw` skips a cross-encoder's activation."""
    if job.cross:
        logits = torch.stack(rows)[:, 0]
        return (logits if raw else activate(logits, activation)).tolist()
    vectors = torch.stack(rows)
    a = vectors[[i for i, _ in job.pairs]]
    b = vectors[[job.num_first + j for _, j in job.pairs]]
    return F.cosine_similarity(a, b, dim=-1).tolist()


def class_probabilities(rows: list[torch.Tensor], activation: str | None) -> list[list[float]]:
    """Each input's logits -> probabilities: softmax over several labels; one label goes through
    the model's activation (a cross-encoder's relevance), as vLLM's /classify does."""
    logits = torch.stack(rows)
    probs = activate(logits, activation) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)
    return probs.tolist()
