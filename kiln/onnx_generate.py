"""An ONNX export's generating graphs behind transformers' ``generate()``: :class:`OnnxGenerator`
is a ``PreTrainedModel`` whose forward runs the decoder graph (and, seq2seq, the encoder graph) with
onnxruntime and keeps transformers' cache, so greedy, beam search, sampling and forced tokens decode
exactly as on the PyTorch model. Imported only when an export generates: it imports torch and
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput, Seq2SeqLMOutput

from kiln.export import DECODER_FILE, ENCODER_FILE, flat, pairs, session


@dataclass
class EncoderOutput(ModelOutput):
    """What the encoder graph gives each decoding step. Both are tensors with the batch first, so
    ``generate()`` repeats them for beams as it repeats a PyTorch encoder's output."""

    last_hidden_state: Any = None
    cross_key_values: Any = None  # (batch, 2 * layers, heads, source length, head size)


class Encoder(torch.nn.Module):
    """The encoder graph, called as transformers calls a model's encoder."""

    main_input_name = "input_ids"  # generate() asks the encoder

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        hidden, cross = self.session.run(None, {"input_ids": input_ids.cpu().numpy(),
                                                "attention_mask": mask.cpu().numpy()})
        return EncoderOutput(last_hidden_state=torch.from_numpy(hidden), cross_key_values=torch.from_numpy(cross))


class OnnxGenerator(PreTrainedModel, GenerationMixin):
    """An exported decoder (and encoder) run by onnxruntime, called like the transformers model it
    was exported from: ``forward`` takes and updates transformers' cache, so ``generate()`` (greedy,
    beams, sampling, forced tokens) decodes exactly as it does on the PyTorch model."""

    main_input_name = "input_ids"
    _supports_sdpa = True  # transformers asks; attention runs inside the graph

    def __init__(self, config: Any, decoder: Any, encoder: Any = None) -> None:
        super().__init__(config)
        # generate() reads the device and dtype from a parameter; the graphs hold the weights.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        self.decoder_session = decoder  # not 'decoder': transformers takes that for a module
        self.encoder = None if encoder is None else Encoder(encoder)
        self.input_names = [i.name for i in decoder.get_inputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past.")]
        shape = next(i.shape for i in decoder.get_inputs() if i.name == "past.0.key")
        self.heads, self.head_size = int(shape[1]), int(shape[3])

    @classmethod
    def from_directory(cls, directory: Path) -> Any:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        encoder = session(directory / ENCODER_FILE) if config.is_encoder_decoder else None
        model = cls(config, session(directory / DECODER_FILE), encoder)
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
        return model.eval()

    def get_encoder(self, modality: str | None = None) -> Any:
        return self.encoder

    def forward(self, input_ids: Any = None, attention_mask: Any = None, decoder_input_ids: Any = None,
                encoder_outputs: Any = None, position_ids: Any = None, cache: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> Any:
        cache = cache if cache is not None else past_key_values
        if self.config.is_encoder_decoder:
            if encoder_outputs is None:
                assert self.encoder is not None  # a seq2seq export has its encoder graph
                encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            self_cache = None if cache is None else cache.self_attention_cache
            ids = decoder_input_ids
            hidden = encoder_outputs.last_hidden_state
            mask = attention_mask if attention_mask is not None else torch.ones(hidden.shape[:2], dtype=torch.long)
            feed = {"decoder_input_ids": ids, "encoder_attention_mask": mask,
                    "encoder_hidden_states": hidden, "cross_key_values": encoder_outputs.cross_key_values}
        else:
            self_cache, ids = cache, input_ids
            seen = 0 if cache is None else cache.get_seq_length()
            mask = attention_mask if attention_mask is not None else torch.ones(
                ids.shape[0], seen + ids.shape[1], dtype=torch.long)
            if position_ids is None:  # what transformers uses without them: the cache's next positions
                position_ids = torch.arange(seen, seen + ids.shape[1]).expand(ids.shape[0], -1)
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        seen = 0 if self_cache is None else self_cache.get_seq_length()
        empty = torch.zeros(ids.shape[0], self.heads, 0, self.head_size)
        past = flat(self_cache) if seen else [empty] * len(self.past_names)
        feed.update(zip(self.past_names, past, strict=True))
        arrays = {name: feed[name].cpu().contiguous().numpy() for name in self.input_names}
        values = self.decoder_session.run(None, arrays)
        logits, present = torch.from_numpy(values[0]), [torch.from_numpy(v) for v in values[1:]]
        if self_cache is not None:  # the graph returns past + new; the cache appends the new part
            for layer, (key, value) in enumerate(pairs(present)):
                self_cache.update(key[:, :, seen:], value[:, :, seen:], layer)
        if self.config.is_encoder_decoder:
            return Seq2SeqLMOutput(logits=logits, cache=cache)
        return CausalLMOutputWithPast(logits=logits, cache=cache)
