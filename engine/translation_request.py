"""What the server hands the translation engine, and what it hands back."""
from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TranslationRequest:
    """One source sentence, already tokenized (eos included, as the tokenizer adds it).

    `params` carries greedy / sampling / beam settings (num_beams, length_penalty,
    early_stopping, no_repeat_ngram_size); `TranslationEngine.default_params` fills them from
    the model's generation_config.json. `stream`: report every decode step's text (greedy and
    sampled requests); otherwise the engine reports the request once, finished, and decodes its
    text once rather than every step.
    """

    source_token_ids: list[int]
    params: SamplingParams
    stream: bool = False
    # tokens forced after the decoder's start token (NLLB's target-language code): the first output
    # tokens, as HF's forced_bos_token_id makes them, so max_tokens and beam lengths count them;
    # None: the model's generation_config forced_bos_token_id (BART's <s>), if it has one
    forced_prefix: tuple[int, ...] | None = None


@dataclass
class TranslationOutput(RequestOutput):
    """A RequestOutput (so metrics and streaming helpers work unchanged) whose prompt is the source.

    `outputs[0]` is the translation: the sampled sequence, or the best beam once search ends
    (beam requests report text only when finished).
    """

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.outputs)
