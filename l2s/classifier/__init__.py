"""The relation classifier: network and card files (`model`), the published network (`reference`)
and its map layout (`layout`), `l2s classifier import` (`importer`), classifiers on the hub (`hub`:
`--classifier user/name`; `push`: `l2s classifier push`), cached maps for training
(`data`), the `l2s train` job (`train`) and its resumable checkpoint (`checkpoint`)."""
