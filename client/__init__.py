"""Site side of hcc-fl: readers, manifest validation, datasets, local training, ClientApp."""
