"""What the stages hand on and what users download: encoder exports, stage hand-offs, merged model
folders and the import of the released weights (one vocabulary, one way to find the latest)."""
