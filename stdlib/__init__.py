"""archc.stdlib"""
