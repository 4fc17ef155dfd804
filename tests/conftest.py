import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OBSLIB_TEST_THREADS", "2")))

TINY = dict(num_layers=4, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny random SD3 pipeline (4 blocks, 4 heads of dim 8) saved with save_pretrained."""
    from obslib.shapes.model import DEFAULT_SAMPLING, build_pipeline
    from obslib.io import write_json

    d = tmp_path_factory.mktemp("tiny") / "tiny-sd3"
    pipe = build_pipeline(seed=0, **TINY)
    pipe.save_pretrained(d)
    write_json(str(d / "obslib_defaults.json"), {**DEFAULT_SAMPLING, "num_inference_steps": 3,
                                                 "calibration_prompts": "shapes-train"})
    return str(d)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random Flux pipeline (obslib.shapes.flux: 1 double- and 1 single-stream block, 8 heads) around the
    embedded SD3 model's VAE, saved with save_pretrained and the embedded Flux model's defaults (3 steps)."""
    from obslib.io import load_pipeline, write_json
    from obslib.paths import DEFAULT_MODEL
    from obslib.shapes import flux

    d = tmp_path_factory.mktemp("tiny") / "tiny-flux"
    pipe = flux.build_flux_pipeline(load_pipeline(DEFAULT_MODEL).vae, num_layers=1, num_single_layers=1)
    pipe.save_pretrained(d)
    write_json(str(d / "obslib_defaults.json"), {**flux.DEFAULT_SAMPLING, "num_inference_steps": 3, "height": 48,
                                                 "width": 48, "calibration_prompts": "shapes-train"})
    return str(d)


@pytest.fixture
def tiny_pipe(tiny_pipe_dir):
    from obslib import load_pipeline

    return load_pipeline(tiny_pipe_dir)


@pytest.fixture
def tiny_sd_pipe(tiny_pipe):
    """A tiny random SD 2.x-style StableDiffusionPipeline (UNet2DConditionModel with cross-attention and GEGLU
    FFNs, epsilon prediction), borrowing the tiny SD3 pipeline's VAE and CLIP tokenizer."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(tiny_pipe.text_encoder.config).eval()
    lat = tiny_pipe.vae.config.latent_channels
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=12, in_channels=lat,
                                out_channels=lat, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=te.config.hidden_size, attention_head_dim=4, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(vae=tiny_pipe.vae, text_encoder=te, tokenizer=tiny_pipe.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_sdxl_pipe(tiny_pipe):
    """A tiny random SDXL pipeline (two CLIP encoders, text-time micro-conditioning), borrowing the tiny SD3
    pipeline's VAE and tokenizer."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = tiny_pipe.text_encoder.config
    te, te2 = CLIPTextModel(cfg).eval(), CLIPTextModelWithProjection(cfg).eval()
    lat = tiny_pipe.vae.config.latent_channels
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=12, in_channels=lat,
                                out_channels=lat, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=2 * cfg.hidden_size, attention_head_dim=4, norm_num_groups=8,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + cfg.projection_dim).eval()
    pipe = StableDiffusionXLPipeline(vae=tiny_pipe.vae, text_encoder=te, text_encoder_2=te2, tokenizer=tiny_pipe.tokenizer,
                                     tokenizer_2=tiny_pipe.tokenizer, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe

