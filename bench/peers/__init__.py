"""Peer model servers for `gradserve bench --peers`: each module runs in its own venv (bench/.peers/<peer>/)."""
