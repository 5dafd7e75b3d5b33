"""CUDA graphs of a pipeline's UNet step (and VAE decode): graph mode of ``DiffusersModel``.

Small batches are launch-bound in eager mode, so replaying one captured graph per denoising step
roughly halves their latency on an H100 (``common/data/h100/README.md``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

GRAPH_GRID = (1, 2, 4, 8, 16, 32)  # batch sizes captured when graph mode has no pad grid of its own
GRAPH_VAE_MAX_STEPS = 4  # capture the VAE decode too for models this few steps (where it is a large share)


class CudaGraphs:
    """CUDA graphs of one pipeline's UNet step (and optionally VAE decode), one per input
    shape, sharing one memory pool; ``pipe.unet.forward`` / ``pipe.vae.decode`` are
    patched to copy their inputs into the static buffers and replay. Calls with a shape
    or an argument that was not captured run the original eager function."""

    def __init__(self, pipe: Any, device: str):
        import torch

        self.torch = torch
        self.pipe, self.device = pipe, torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()
        # key (input shapes, dtype) -> (graph, static inputs, static output)
        self.unet_graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}
        self.vae_graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}
        self._unet_forward = pipe.unet.forward
        self._vae_decode = pipe.vae.decode
        pipe.unet.forward = self._unet_call
        pipe.vae.decode = self._vae_call

    def release(self) -> None:
        """Restore the eager functions and drop the graphs (their pool is freed)."""
        for module, attr in ((self.pipe.unet, "forward"), (self.pipe.vae, "decode")):
            module.__dict__.pop(attr, None)
        self.unet_graphs.clear()
        self.vae_graphs.clear()
        self.pool = None

    def _capture(self, fn: Callable[..., Any], static_inputs: list[Any]) -> tuple[Any, list[Any], Any]:
        torch = self.torch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (cuDNN/cuBLAS choices, lazy inits) outside the capture
            for _ in range(2):
                fn(*static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*static_inputs)
        return graph, static_inputs, out

    # --- UNet step ---------------------------------------------------------------------
    @staticmethod
    def _unet_key(sample: Any, encoder_hidden_states: Any) -> tuple[Any, ...]:
        return tuple(sample.shape), tuple(encoder_hidden_states.shape), sample.dtype

    def capture_unet(self, rows: int, height: int, width: int, seq_len: int) -> None:
        torch, unet = self.torch, self.pipe.unet
        sample = torch.randn(rows, unet.config.in_channels, height, width, device=self.device, dtype=unet.dtype)
        timestep = torch.tensor(999.0, device=self.device)  # float32 0-d; int timesteps are copied in exactly
        states = torch.randn(rows, seq_len, unet.config.cross_attention_dim, device=self.device, dtype=unet.dtype)
        forward = self._unet_forward
        self.unet_graphs[self._unet_key(sample, states)] = self._capture(
            lambda s, t, e: forward(s, t, encoder_hidden_states=e, return_dict=False)[0], [sample, timestep, states]
        )

    def _unet_call(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any = None,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        torch = self.torch
        entry = None
        if (
            not args
            and all(v is None for v in kwargs.values())
            and encoder_hidden_states is not None
            and torch.is_tensor(timestep)
            and timestep.numel() == 1
        ):
            entry = self.unet_graphs.get(self._unet_key(sample, encoder_hidden_states))
        if entry is None:
            return self._unet_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        graph, (s, t, e), out = entry
        s.copy_(sample)
        t.copy_(timestep.reshape(()))
        e.copy_(encoder_hidden_states)
        graph.replay()
        result = out.clone()
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)

    # --- VAE decode --------------------------------------------------------------------
    def capture_vae(self, batch: int, height: int, width: int) -> None:
        torch, vae = self.torch, self.pipe.vae
        z = torch.randn(batch, vae.config.latent_channels, height, width, device=self.device, dtype=vae.dtype)
        decode = self._vae_decode
        self.vae_graphs[(tuple(z.shape), z.dtype)] = self._capture(lambda x: decode(x, return_dict=False)[0], [z])

    def _vae_call(self, z: Any, return_dict: bool = True, generator: Any = None) -> Any:
        entry = self.vae_graphs.get((tuple(z.shape), z.dtype))
        if entry is None:
            return self._vae_decode(z, return_dict=return_dict, generator=generator)
        graph, (static_z,), out = entry
        static_z.copy_(z)
        graph.replay()
        result = out.clone()
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=result)
        return (result,)
