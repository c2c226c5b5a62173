"""Training algorithms on top of a Manager: DiLoCo and LocalSGD (with
streaming fragments), the codecs that compress pseudo-gradients, and the
data sampler that shards a dataset across groups."""
