"""Data: image sources and the default photo set, the Real-ESRGAN degradation model, and the cold start's
target chains.

Pure (numpy / OpenCV / Pillow; no Ray): ``PairDataset.sample(cursor)`` returns a ``core.records.Sample`` whose
LR image and degradation labels are a deterministic function of the config and the cursor;
``sft_targets.build_record`` turns a Sample into the chain a perfect policy would write.
"""
