"""Model surgery: swap fused modules into existing timm, torchvision and Hugging Face ViTs."""
