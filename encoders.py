"""
encoders.py: every pretrained network of the project, the only place pretrained weights enter. Imports nothing of
the project.

  VAE          the frozen image autoencoder (diffusers AutoencoderKL, or "none": pixel space), load_vae
  TextEncoder  a frozen open_clip text tower: 77 token ids (x 1-3 chunks) -> per-token states + pooled embedding,
               load_text_encoder
               ("ARCH/TAG", a local open_clip folder or checkpoint, or "tiny": random, for tests and the demos)
  ClipScorer   the CLIP score of evaluate.py (and train.py's in-run eval): open_clip's image and text towers
  InceptionV3  TF-Inception "2015-12-05" through torch-fidelity: FID and Inception Score features

Loaders try the local files first (a folder, the Hugging Face / open_clip cache) and the network only when those do
not have the weights; a network that cannot be had raises LoadError with a one-line reason and the offline way out.
"""
import io
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

CONTEXT_LENGTH = 77  # CLIP's token window: one chunk (start of text, 75 caption tokens, end of text)
MAX_CHUNKS = 3       # text_chunks: 1 (CLIP's 77) to 3 (kohya's max_token_length 225)


def check_chunks(chunks):
    """Raise ValueError unless `chunks` (the text_chunks key) is an int in 1..MAX_CHUNKS."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= MAX_CHUNKS:
        raise ValueError(f"text_chunks must be 1..{MAX_CHUNKS} (chunks of 75 caption tokens), got {chunks!r}")


class LoadError(Exception):
    """An input that cannot be loaded: here a pretrained network (offline without its files, a broken checkpoint);
    sources.py's DataError (an empty, missing or unreadable data source) is a LoadError too, so one `except LoadError`
    catches every reason a run cannot start from its inputs (the command lines map it to exit code 2)."""

#################################################################################
#                                  The VAE                                      #
#################################################################################

class VAE:
    """encode: images (B,3,H,W) in [-1,1] -> scaled latents (B,C,H/f,W/f); decode inverts. "none" = identity."""
    def __init__(self, name, model=None, device="cpu"):
        self.name, self.model, self.device = name, model, torch.device(device)
        cfg = model.config if model is not None else None
        self.channels = cfg.latent_channels if cfg else 3
        self.factor = 2 ** (len(cfg.block_out_channels) - 1) if cfg else 1
        self.scaling_factor = float(cfg.scaling_factor) if cfg else 1.0
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0) if cfg else 0.0  # 0 for SD VAEs

    @torch.no_grad()
    def encode(self, images):
        if self.model is None:
            return images
        # the posterior mean: no noise baked into the cache
        mean = self.model.encode(images.to(self.device, torch.float32)).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor  # diffusers' training scripts: latents * scaling_factor

    @torch.no_grad()
    def decode(self, latents):
        if self.model is None:
            return latents.clamp(-1, 1)
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.model.decode(z).sample.clamp(-1, 1)


def load_vae(name, device="cpu"):
    """'none', a hub name (e.g. stabilityai/sd-vae-ft-mse) or a local diffusers folder."""
    if name == "none":
        return VAE("none", None, device)
    from diffusers import AutoencoderKL
    pipeline_folder = os.path.isdir(os.path.join(name, "vae")) and not os.path.exists(os.path.join(name, "config.json"))
    sub = {"subfolder": "vae"} if pipeline_folder else {}
    try:  # offline first: a local folder or the Hugging Face cache; the network only when neither has it
        model = AutoencoderKL.from_pretrained(name, local_files_only=True, **sub)
    except OSError:
        try:
            model = AutoencoderKL.from_pretrained(name, **sub)
        except OSError as e:
            raise LoadError(f"cannot load the VAE {name!r} ({e}): offline, give a local diffusers folder, "
                            "or use 'none'") from None
    return VAE(name, model.eval().requires_grad_(False).to(device), device)

#################################################################################
#                              open_clip models                                 #
#################################################################################

def open_clip_quick_gelu(arch, tag):
    """Whether open_clip's pretrained tag was trained with QuickGELU (OpenAI's weights are). open_clip builds ARCH's
    config as written, GELU for ViT-L-14, and loads the tag's weights into it with only a warning: pass this as
    create_model's force_quick_gelu, also where a local file stands in for the tag (evaluate.py --clip_weights).
    A bare local file here is taken as ViT-L-14 with GELU, the LAION checkpoint this project uses."""
    import open_clip
    return bool(tag) and bool((open_clip.get_pretrained_cfg(arch, tag) or {}).get("quick_gelu", False))


def open_clip_model(name, weights=""):
    """-> (open_clip CLIP model, its tokenizer), both towers. name: 'ARCH/TAG' (open_clip pretrained; `weights`: a
    local checkpoint of that tag, offline), a local open_clip folder (open_clip_config.json) or checkpoint file
    (ViT-L-14 architecture), or 'tiny': a random CLIP with a 2-layer width-64 text tower, the same in every process.
    Raises open_clip's own errors (OSError, RuntimeError, ValueError): the callers word them."""
    import open_clip
    if name == "tiny":
        with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
            torch.manual_seed(0)
            vision_cfg = dict(image_size=32, patch_size=16, width=32, layers=1, head_width=32)
            text_cfg = dict(context_length=CONTEXT_LENGTH, width=64, heads=2, layers=2)
            model = open_clip.model.CLIP(embed_dim=64, vision_cfg=vision_cfg, text_cfg=text_cfg)
        return model, open_clip.get_tokenizer("ViT-L-14")
    if os.path.isdir(name):
        return open_clip.create_model("local-dir:" + name), open_clip.get_tokenizer("local-dir:" + name)
    if os.path.isfile(name):
        return open_clip.create_model("ViT-L-14", pretrained=name), open_clip.get_tokenizer("ViT-L-14")
    arch, _, tag = name.partition("/")
    model = open_clip.create_model(arch, pretrained=weights or tag or None,
                                   force_quick_gelu=open_clip_quick_gelu(arch, tag))
    return model, open_clip.get_tokenizer(arch)

#################################################################################
#                                The text tower                                 #
#################################################################################

class TextEncoder:
    """A frozen open_clip text tower: token ids in chunks of 77 -> per-token states after ln_final + pooled EOT
    embedding. `model` is the whole open_clip model; its image tower is kept only when asked for (ClipScorer.load
    reuses it). chunks (text_chunks, 1..3): a caption is encoded as up to `chunks` windows of 75 BPE tokens, each with
    its own start / end of text, and the states concatenated: 77 x chunks tokens. This is the usual remedy for
    captions past CLIP's window, A1111's prompt chunks (modules/sd_hijack_clip.py) and kohya sd-scripts'
    max_token_length 150 / 225; chunks=1 is the plain 77-token tower."""
    def __init__(self, name, model, tokenizer, device="cpu", chunks=1):
        check_chunks(chunks)
        self.name, self.model, self.tokenizer, self.device = name, model, tokenizer, torch.device(device)
        self.tower = getattr(model, "text", model)  # CLIP keeps the tower's parts on itself, CustomTextCLIP under .text
        assert getattr(self.tower, "cls_emb", None) is None, "text towers with a CLS token are not supported"
        proj = self.tower.text_projection
        self.dim = self.tower.ln_final.weight.shape[0]
        self.pooled_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.chunks = chunks
        self.context_length = CONTEXT_LENGTH * chunks  # tokens of the states encode() returns
        self.sot, self.eot = tokenizer.sot_token_id, tokenizer.eot_token_id

    def token_ids(self, caption):
        """A caption's token ids: start-of-text, its BPE ids, end-of-text; not truncated (pack() does that, and
        truncated() tells a caption that does not fit)."""
        return [self.sot] + self.tokenizer.encode(caption) + [self.eot]

    def truncated(self, ids):
        """Whether pack() drops some of token_ids()' `ids`: more than 75 x chunks BPE ids."""
        return len(ids) - 2 > (CONTEXT_LENGTH - 2) * self.chunks

    def pack(self, ids_list):
        """token_ids() lists -> LongTensor (N, 77 x chunks). The BPE ids between start and end of text are cut into
        up to `chunks` pieces of 75, each written as [SOT, piece, EOT] padded with 0 to 77 (open_clip's padding); a
        chunk the caption does not reach is the empty caption's [SOT, EOT, 0, ...]; ids past 75 x chunks are dropped
        (the last chunk still ends with EOT). chunks=1 is open_clip's tokenizer: the first 76 ids and EOT."""
        body = CONTEXT_LENGTH - 2  # caption tokens per chunk
        tokens = torch.zeros(len(ids_list), self.chunks, CONTEXT_LENGTH, dtype=torch.long)  # (N, chunks, 77)
        for i, ids in enumerate(ids_list):
            bpe = ids[1:-1]
            for k in range(self.chunks):
                chunk = [self.sot] + bpe[k * body:(k + 1) * body] + [self.eot]
                tokens[i, k, :len(chunk)] = torch.tensor(chunk)
        return tokens.reshape(len(ids_list), -1)  # (N, 77 x chunks)

    def tokenize(self, captions):
        return self.pack([self.token_ids(c) for c in captions])

    @torch.no_grad()
    def encode(self, tokens):
        """tokens (N, 77 k), k = 1..chunks, as pack() writes them -> states (N, 77 k, dim), pooled (N, pooled_dim),
        float32. Every chunk goes through the tower on its own, one call per chunk over the N captions (as A1111
        does): a matmul's rounding depends on its batch size, so one call over N k windows would give the first
        chunk states a few ulp away from the 77-token tower's; this way they are bit for bit the same. pooled is the
        first chunk's: for a caption of at most 75 tokens it is exactly the plain tower's, and it is what both
        references give SDXL's pooled input: kohya sd-scripts with max_token_length 150 / 225
        (library/strategy_sdxl.py, _get_hidden_states_sdxl: `pool2 = pool2[::n_size]`, "pool uses the first of n")
        and A1111 (modules/sd_hijack_clip.py: `zs[0].pooled`). The later chunks reach the model through the states."""
        tokens = tokens.to(self.device)
        k = tokens.shape[1] // CONTEXT_LENGTH
        if tokens.shape[1] % CONTEXT_LENGTH or not 1 <= k <= self.chunks:
            raise ValueError(f"tokens {tuple(tokens.shape)}: expected (N, 77 x k) with k in 1..{self.chunks}")
        chunks = [self.encode_chunk(w) for w in tokens.split(CONTEXT_LENGTH, dim=1)]  # k x ((N, 77, dim), (N, P))
        return torch.cat([c[0] for c in chunks], dim=1), chunks[0][1]  # (N, 77 k, dim), (N, pooled_dim)

    @torch.no_grad()
    def encode_chunk(self, tokens):
        """tokens (N, 77) -> states (N, 77, dim), pooled (N, pooled_dim), float32: the plain tower, as open_clip's
        encode_text computes it with the per-token states kept."""
        t = self.tower
        x = t.token_embedding(tokens) + t.positional_embedding  # (N, 77, dim)
        x = t.transformer(x, attn_mask=t.attn_mask)  # (N, 77, dim): open_clip >= 2.26 takes batch-first input
        states = t.ln_final(x)  # (N, 77, dim)
        # the EOT token has the largest id: its state is the pooled one (open_clip's text_global_pool 'argmax')
        eot = states[torch.arange(len(tokens), device=tokens.device), tokens.argmax(-1)]  # (N, dim)
        proj = t.text_projection
        pooled = proj(eot) if isinstance(proj, nn.Linear) else eot @ proj  # (N, pooled_dim)
        return states.float(), pooled.float()

    def __call__(self, captions):
        return self.encode(self.tokenize(captions))


def load_text_encoder(name, device="cpu", image_tower=False, chunks=1):
    """open_clip_model(name)'s text tower (see there for the names). image_tower: keep the image tower too, for a
    ClipScorer that reuses this model (train.py's in-run CLIP score: one load); otherwise it is dropped (~300M
    parameters for ViT-L/14). chunks: text_chunks, see TextEncoder (ValueError outside 1..3, before any loading)."""
    check_chunks(chunks)
    try:
        model, tokenizer = open_clip_model(name)
    except (OSError, RuntimeError, ValueError) as e:
        raise LoadError(f"cannot load the text encoder {name!r} ({type(e).__name__}: {e}): offline, give a local "
                        "open_clip checkpoint, or use 'tiny'") from None
    if not image_tower:
        model.visual = None
    return TextEncoder(name, model.eval().requires_grad_(False).to(device), tokenizer, device, chunks)

#################################################################################
#                         Evaluation networks (evaluate.py)                     #
#################################################################################

class InceptionV3:
    """images uint8 (B, H, W, 3) -> (pool features (B, 2048) float32, logits over 1008 classes without the fc bias
    (B, 1008) float64), on the CPU. The unbiased logits are what OpenAI's IS code used (matmul with the fc weights)."""
    name = "inception-v3-compat-2015-12-05"

    def __init__(self, weights_path=None, device="cpu"):
        # imported here: only the real extractor needs torch-fidelity (tests inject small networks instead)
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
        if weights_path and not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Inception weights not found: {weights_path}")
        # torch-fidelity unpickles the weights with weights_only=False (a pickle can run code): load them here
        # as tensors only, and hand it a re-serialised copy of that plain state dict
        try:
            state = (torch.load(weights_path, map_location="cpu", weights_only=True) if weights_path else
                     torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", weights_only=True))
        except OSError as e:  # offline and not in the torch hub cache
            raise RuntimeError(f"cannot download the Inception weights ({e}): get torch-fidelity's "
                               "weights-inception-2015-12-05-6726825d.pth") from None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer)
        self.net, self.device = net.to(device), torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple:
        pool, logits = self.net(images.permute(0, 3, 1, 2).contiguous().to(self.device))  # uint8 (B, 3, H, W) in
        return pool.float().cpu(), logits.double().cpu()  # statistics are taken in float64 (feature_stats)


class ClipScorer:
    """(images uint8 (B, H, W, 3), captions) -> CLIP score per image: 100 * max(cos(image, caption), 0), the
    convention of torchmetrics' CLIPScore (Hessel et al. 2021, arXiv 2104.08718, with w = 100)."""

    def __init__(self, model, preprocess, tokenizer, name="clip", device="cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.name, self.device = name, torch.device(device)

    @classmethod
    def load(cls, name="ViT-L-14/openai", weights="", device="cpu", text_encoder=None):
        """name: as open_clip_model's, "ARCH/TAG" with `weights` a local checkpoint of that tag (offline). The tag
        decides the activation: ViT-L-14/openai is OpenAI's QuickGELU model, the one torchmetrics' CLIPScore uses
        (open_clip would otherwise build ViT-L-14 with GELU and load OpenAI's weights into it). text_encoder: a
        loaded TextEncoder of the same name and device that kept its image tower (load_text_encoder's image_tower)
        lends its model, so a run loads its CLIP once."""
        from open_clip import get_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg, image_transform_v2
        te = text_encoder
        if te is not None and (te.name, te.device, weights) == (name, torch.device(device), "") \
                and getattr(te.model, "visual", None) is not None:
            model, tokenizer = te.model, te.tokenizer
        else:
            model, tokenizer = open_clip_model(name, weights)
        # create_model_and_transforms' validation transform, from the preprocess_cfg the model carries
        preprocess = image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(model)), is_train=False)
        return cls(model, preprocess, tokenizer, name=name, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images.numpy()]).to(self.device)
        image_emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (B, E)
        text_emb = F.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)).float(), dim=-1)
        return (100 * (image_emb * text_emb).sum(dim=-1)).clamp(min=0).double().cpu()  # (B,)
