"""What every role shares: PCollection element types, dead-letter records,
isolating the bad elements of a batch, running work ahead on threads, and
fitting partition specs to a mesh (serving and training both shard)."""
