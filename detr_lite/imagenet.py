"""torchvision's ImageNet weights for the backbone: where the torch cache keeps them, and a check
that they are there before a run that asks for them (``model.pretrained_backbone``) starts."""

from __future__ import annotations

from pathlib import Path


def pretrained_backbone_cache(backbone: str = "resnet50") -> tuple[Path, str]:
    """(cache file, source URL) of torchvision's ImageNet weights for ``backbone``.

    The official DETR/Deformable runs start from torchvision's ``IMAGENET1K_V1`` ResNet weights;
    torch keeps downloaded weights in ``$TORCH_HOME/hub/checkpoints`` (default
    ``~/.cache/torch/hub/checkpoints``), which is where an offline machine needs a copy.
    """
    import torch.hub
    import torchvision

    enum = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}
    if backbone not in enum:
        raise ValueError(f"backbone: expected one of {sorted(enum)}, received {backbone!r}")
    weights = torchvision.models.get_weight(f"{enum[backbone]}_Weights.IMAGENET1K_V1")
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name, weights.url


def ensure_pretrained_backbone(backbone: str = "resnet50", download: bool = True) -> Path:
    """Make sure the ImageNet weights are in the torch cache (download them if allowed and online).

    Training a DETR from a random backbone silently wastes days, so unlike the model builder
    (which only warns) this raises a one-line ``ValueError`` naming the cache path when the file
    is missing and cannot be fetched. The trainer calls it before building anything.
    """
    path, url = pretrained_backbone_cache(backbone)
    if path.is_file():
        return path
    instead = f"copy {Path(url).name} there"
    if not download:
        raise ValueError(
            f"ImageNet weights for {backbone} are not at {path}; {instead} (from a machine with internet), "
            "or train with --no-pretrained-backbone"
        )
    import torch.hub

    try:
        torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as err:  # offline: URLError, OSError, ...
        raise ValueError(
            f"ImageNet weights for {backbone} are not at {path} and could not be downloaded "
            f"({type(err).__name__}); {instead}, or train with --no-pretrained-backbone"
        ) from None
    return path
