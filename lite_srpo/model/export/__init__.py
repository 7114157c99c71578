"""`lite-srpo export`: a checkpoint as a peft adapter or a merged model, verified by logits."""
