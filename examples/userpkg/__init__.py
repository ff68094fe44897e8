"""A small user package: the data builders, collator, model builder and loss a user of
distrain writes for their own data and models, referred to from configs by import path
(`data.name: examples.userpkg.data:token_file`)."""
