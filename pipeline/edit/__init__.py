"""The weight edit: activations, refusal directions, layer choice, kernels, the edit, search."""
