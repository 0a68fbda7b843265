"""Speech: text-to-speech, streaming speech-to-text and the automatic responder."""
