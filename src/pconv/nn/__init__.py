"""The spiking network and its arithmetic: the formulas QCFS and the neurons share (functional), how many
neurons a site has (population), DA-QCFS (qcfs), the neurons and their engines (neurons), the count engine's
neuron as one GPU kernel for CUDA graphs (count_kernel), and the SNN module (network)."""
