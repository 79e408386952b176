"""nn.Modules over the fastvit ops."""
